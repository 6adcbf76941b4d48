"""The actor loop's admission control and weight-swap policy, with a fake engine (the
real method names) and real ZeroMQ sockets on loopback: no sample may be admitted
that the learner would train with staleness above async.max_staleness."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from asyncopd.actor.worker import ActorLoop
from asyncopd.config import from_dict
from asyncopd.tasks import load_task
from asyncopd.tasks.tokenizer import build_char_tokenizer
from asyncopd.transport.sockets import Channel
from asyncopd.types import Rollout, RolloutBatch, ScoreAck, ScoreAckBatch, Shutdown, TeacherReference, WeightUpdate


class FakeEngine:
    """Stands in for VllmEngine: requests finish only when `finish_all` is set, and
    never those named in `keep`."""

    def __init__(self) -> None:
        self.pending: dict[str, list[int]] = {}
        self.added: list[str] = []
        self.loaded_versions = 0
        self.finish_all = True
        self.keep: set[str] = set()
        self.scoring: dict[str, tuple[list[int], np.ndarray]] = {}

    def add(self, request_id, prompt_ids, *, greedy=False, seed=None, temperature=None) -> None:
        self.pending[request_id] = []
        self.added.append(request_id)

    def add_scoring(self, request_id, prompt_ids, response_ids) -> None:
        self.scoring[request_id] = (list(prompt_ids), np.asarray(response_ids, np.int32))
        self.add(request_id, prompt_ids)

    @property
    def num_unfinished(self) -> int:
        return len(self.pending)

    def step(self, policy_version: int):
        from asyncopd.actor.engine import Completion

        for tokens in self.pending.values():
            tokens.append(policy_version)
        if not self.finish_all:
            return []
        kept = {rid: v for rid, v in self.pending.items() if rid in self.keep}
        self.pending = {rid: v for rid, v in self.pending.items() if rid not in self.keep}
        done = [Completion(request_id=rid, token_ids=np.array([7, 1], np.int32)[: len(v) + 1][-2:],
                           logprobs=np.full(2, -0.5, np.float32),
                           token_policy_versions=np.array([v[0], v[-1]], np.int32), finish_reason="stop")
                for rid, v in self.pending.items() if rid not in self.scoring]
        done += [Completion(request_id=rid, token_ids=self.scoring[rid][1],
                            logprobs=np.full(len(self.scoring[rid][1]), -2.0, np.float32),
                            token_policy_versions=np.full(len(self.scoring[rid][1]), v[0], np.int32),
                            finish_reason="scored")
                 for rid, v in self.pending.items() if rid in self.scoring]
        self.pending = kept
        return done

    def receive_weights(self, update) -> float:
        self.loaded_versions += 1
        return 0.0


class FakeWeightGroup:
    def broadcast(self, tensor) -> None:
        tensor.zero_()


def make_loop(eta: int, schedule: str, *, batch_size: int = 4, num_steps: int = 6, samples_per_prompt: int = 2,
              max_num_seqs: int = 64, evaluation: dict | None = None, references=None):
    cfg = from_dict({"async": {"max_staleness": eta, "schedule": schedule},
                     "eval": evaluation or {"enabled": False}, "task": {"num_eval_prompts": 4},
                     "learner": {"batch_size": batch_size, "num_steps": num_steps},
                     "actor": {"samples_per_prompt": samples_per_prompt, "max_num_seqs": max_num_seqs}})
    inbox = Channel(zmq.PULL, bind_host="127.0.0.1")
    teacher = Channel(zmq.ROUTER, bind_host="127.0.0.1")
    learner = Channel(zmq.PULL, bind_host="127.0.0.1")
    dealer = Channel(zmq.DEALER, connect=[teacher.address], identity=b"actor-0")
    stats = Channel(zmq.PUSH, connect=[learner.address])
    control = Channel(zmq.PUSH, connect=[inbox.address])
    engine = FakeEngine()
    loop = ActorLoop(cfg, 0, engine=engine, task=load_task(cfg.task), tokenizer=build_char_tokenizer(),
                     weight_group=FakeWeightGroup(), inbox=inbox, dealer=dealer, stats_out=stats,
                     references=references)
    return loop, engine, control, teacher


def push_weights(loop, control, version: int) -> None:
    control.send(WeightUpdate(policy_version=version, buckets=[]))
    deadline = time.monotonic() + 5
    while loop.policy_version != version and time.monotonic() < deadline:
        loop.run_once(0.01)


def drain_rollouts(teacher: Channel, batches: list[RolloutBatch] | None = None) -> list[Rollout]:
    """The rollouts that reached the fake teacher (its heartbeats left out), each
    RolloutBatch also appended to ``batches``."""
    out = []
    while (got := teacher.recv(timeout_s=0.05)) is not None:
        if isinstance(got[1], RolloutBatch):
            out += got[1].rollouts
            if batches is not None:
                batches.append(got[1])
    return out


@pytest.mark.parametrize("schedule", ["bounded", "fixed_lag"])
@pytest.mark.parametrize("eta", [0, 1, 2])
def test_admitted_samples_never_exceed_the_staleness_bound(eta: int, schedule: str) -> None:
    loop, engine, control, teacher = make_loop(eta, schedule)
    rollouts: list[Rollout] = []
    for version in range(6):
        push_weights(loop, control, version)
        for _ in range(5):
            loop.run_once(0.01)
        got = drain_rollouts(teacher)
        rollouts += got
        # Actors may run at most eta steps ahead: slots up to batch version + eta exist.
        assert max(r.batch_index for r in rollouts) <= min(version + eta, 5)
    assert len(rollouts) == 6 * 4  # every slot of every step, exactly once
    for r in rollouts:
        assert r.batch_index - r.policy_version <= eta  # trained at version batch_index
    groups: dict[int, set[int]] = {}
    for r in rollouts:
        groups.setdefault(r.group_id, set()).add(r.batch_index)
    assert all(len(v) == 1 for v in groups.values()) and all(
        sum(r.group_id == g for r in rollouts) == 2 for g in groups)


def test_fixed_lag_takes_new_weights_only_between_batches() -> None:
    loop, engine, control, teacher = make_loop(1, "fixed_lag")
    engine.finish_all = False
    push_weights(loop, control, 0)
    loop.run_once(0.01)
    assert engine.num_unfinished == 2 * 4  # batches 0 and 1, both by version 0
    control.send(WeightUpdate(policy_version=1, buckets=[]))
    for _ in range(5):
        loop.run_once(0.01)
    assert loop.policy_version == 0  # requests in flight: the swap waits
    engine.finish_all = True
    for _ in range(5):
        loop.run_once(0.01)
    assert loop.policy_version == 1
    rollouts = drain_rollouts(teacher)
    assert {(r.batch_index, r.policy_version) for r in rollouts} >= {(0, 0), (1, 0), (2, 1)}
    assert all(int(r.token_policy_versions.max()) == r.policy_version for r in rollouts)


def test_bounded_update_waits_for_the_step_it_makes_due_then_loads_in_flight() -> None:
    """An update to version v does not re-prefill requests of steps <= v (the learner
    trains step v next and would wait for them); later steps take it in flight."""
    loop, engine, control, teacher = make_loop(2, "bounded")
    engine.finish_all = False
    push_weights(loop, control, 0)
    loop.run_once(0.01)
    batches = {r.batch_index for r in loop.inflight.values()}
    assert batches == {0, 1, 2}  # eta = 2: up to two steps ahead
    control.send(WeightUpdate(policy_version=1, buckets=[]))
    deadline = time.monotonic() + 5
    while not loop.pending_updates and time.monotonic() < deadline:
        loop.run_once(0.01)
    for _ in range(5):
        loop.run_once(0.01)
    assert loop.pending_updates and loop.policy_version == 0  # steps 0 and 1 still running
    assert engine.loaded_versions == 1
    engine.keep = {rid for rid, r in loop.inflight.items() if r.batch_index == 2}
    engine.finish_all = True
    for _ in range(5):
        loop.run_once(0.01)
    assert loop.policy_version == 1 and engine.loaded_versions == 2  # loaded with step 2 in flight
    assert engine.keep <= set(loop.inflight)
    engine.keep = set()
    for _ in range(5):
        loop.run_once(0.01)
    rollouts = drain_rollouts(teacher)
    step2 = [r for r in rollouts if r.batch_index == 2]
    assert step2 and all(r.policy_version == 0 and int(r.token_policy_versions.max()) == 1 for r in step2)
    assert all(int(r.token_policy_versions.max()) == 0 for r in rollouts if r.batch_index <= 1)


def test_unscored_rollout_is_resampled_for_the_same_slot() -> None:
    loop, engine, control, teacher = make_loop(0, "bounded")
    loop.cfg.teacher.max_retries = 1
    push_weights(loop, control, 0)
    loop.run_once(0.01)
    batches: list[RolloutBatch] = []
    first = drain_rollouts(teacher, batches)
    assert len(first) == 4 and len(batches) == 1  # what one engine step finished: one frame
    victim = first[0]
    for attempt in range(2):  # one retry, then the degrade policy
        fail = ScoreAck(rollout_id=victim.rollout_id, ok=False, policy_version=0, error="boom")
        # The first as a lone ScoreAck (an older teacher), the second in a batch with an ok ack.
        teacher.send(fail if attempt == 0 else ScoreAckBatch.of([fail, ScoreAck(
            rollout_id=first[1].rollout_id, ok=True, policy_version=0)]), identity=b"actor-0")
        deadline = time.monotonic() + 2
        while loop.num_retries + loop.num_unscored < attempt + 1 and time.monotonic() < deadline:
            loop.run_once(0.01)
    loop.run_once(0.01)
    again = drain_rollouts(teacher)
    assert loop.num_retries == 1 and loop.num_unscored == 1
    assert first[1].rollout_id not in loop.unacked and first[2].rollout_id in loop.unacked
    resampled = [r for r in again if r.rollout_id != victim.rollout_id]
    assert len(resampled) == 1
    assert (resampled[0].batch_index, resampled[0].group_id) == (victim.batch_index, victim.group_id)
    # It fills the dropped sample's slot: the buffer keeps only one of the two should both arrive.
    assert resampled[0].slot_id == victim.rollout_id and resampled[0].slot == victim.slot == victim.rollout_id


def test_shutdown_ends_the_loop() -> None:
    loop, engine, control, teacher = make_loop(1, "bounded")
    control.send(Shutdown(policy_version=0, reason="test"))
    deadline = time.monotonic() + 2
    while loop.run_once(0.01):
        assert time.monotonic() < deadline


@pytest.mark.parametrize("samples_per_prompt", [2, 8])
def test_admission_keeps_the_engine_queue_within_twice_max_num_seqs(samples_per_prompt: int) -> None:
    """Groups enter the engine a few at a time (a whole batch at once stalled it after
    each weight load); a group larger than the window still enters whole, alone."""
    loop, engine, control, teacher = make_loop(1, "bounded", batch_size=16, num_steps=3,
                                               samples_per_prompt=samples_per_prompt, max_num_seqs=2)
    engine.finish_all = False
    push_weights(loop, control, 0)
    loop.run_once(0.01)
    assert engine.num_unfinished == max(4, samples_per_prompt)
    engine.finish_all = True
    rollouts: list[Rollout] = []
    for version in range(3):
        push_weights(loop, control, version)
        for _ in range(40):
            assert engine.num_unfinished <= max(4, samples_per_prompt)
            loop.run_once(0.01)
        rollouts += drain_rollouts(teacher)
    assert sorted(r.batch_index for r in rollouts) == [k for k in range(3) for _ in range(16)]
    assert all(r.batch_index - r.policy_version <= 1 for r in rollouts)
    groups = {r.group_id for r in rollouts}
    assert all(sum(r.group_id == g for r in rollouts) == samples_per_prompt for g in groups)


def test_an_evaluation_scores_the_teacher_samples_with_the_student() -> None:
    """At an eval version, each held-out prompt with a teacher sample gets one scoring
    request; its rollout carries the teacher's tokens, the student's log-probs of them and
    the teacher's ending, and takes no weights update while in flight."""
    references = [TeacherReference(prompt_index=i, prompt_ids=np.array([5, 6, i + 3], np.int32),
                                   response_ids=np.array([9, 9, 1][: i + 1], np.int32),
                                   finish_reason="stop" if i == 2 else "length") for i in (0, 2)]
    loop, engine, control, teacher = make_loop(1, "bounded", evaluation={"enabled": True, "rkl_samples": 1},
                                               references=references)
    engine.finish_all = False
    push_weights(loop, control, 0)
    assert sorted(p for p, _ in engine.scoring.values()) == [[5, 6, 3], [5, 6, 5]]
    control.send(WeightUpdate(policy_version=1, buckets=[]))
    for _ in range(5):
        loop.run_once(0.01)
    assert loop.policy_version == 0  # no new weights under an evaluation
    engine.finish_all = True
    loop.run_once(0.01)
    sent = drain_rollouts(teacher)
    got = [r for r in sent if r.kind == "eval_reference"]
    assert sorted((r.group_id, r.response_ids.tolist(), r.finish_reason) for r in got) == [
        (0, [9], "length"), (2, [9, 9, 1], "stop")]
    assert all(r.batch_index == 0 and (r.behaviour_logprobs == -2.0).all() for r in got)
    # Scored tokens are not generated ones.
    assert loop.tokens_generated == sum(r.response_ids.shape[0] for r in sent if r.kind != "eval_reference") > 0


def test_a_resumed_actor_starts_at_the_first_batch_the_checkpoint_lacks_with_slot_seeds() -> None:
    """fixed_lag, eta=1, resumed at version 3 with step 3's samples restored: the actor
    generates step 4 (with version 3) first, and its ids and seeds depend on the slot only."""
    from asyncopd.types import ResumePoint

    loop, engine, control, teacher = make_loop(1, "fixed_lag")
    loop.resume = ResumePoint(policy_version=3, run_start_version=0, first_batch=4, evaluated=[0])
    push_weights(loop, control, 3)
    for _ in range(5):
        loop.run_once(0.01)
    rollouts = drain_rollouts(teacher)
    assert {r.batch_index for r in rollouts} == {4}
    assert sorted(r.group_id for r in rollouts) == [8, 8, 9, 9]  # groups_per_step=2: groups 8, 9 are step 4's
    assert sorted(r.rollout_id for r in rollouts) == ["0-t8.0", "0-t8.1", "0-t9.0", "0-t9.1"]
    from asyncopd.actor.worker import _Request

    fresh = make_loop(1, "fixed_lag")[0]  # has made no request yet; `loop` made four
    probe = _Request("train", None, [1], 8, 4, 1)
    assert loop._slot_id_and_seed(probe) == fresh._slot_id_and_seed(probe)
    assert loop._slot_id_and_seed(probe)[1] != loop._slot_id_and_seed(_Request("train", None, [1], 8, 4, 0))[1]
