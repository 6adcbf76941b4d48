"""The teacher pool's routing and health (pure, fake clock) and the actor's pool client
(fake DEALERs with the real method names): retries go to a different teacher, a silent
teacher is routed around and its rollouts resent at once, it rejoins when it answers."""

from __future__ import annotations

import numpy as np
import pytest

from asyncopd.actor.teachers import TeacherPoolClient
from asyncopd.config import TeacherConfig
from asyncopd.transport.pool import TeacherPool
from asyncopd.types import Heartbeat, Rollout, RolloutBatch, ScoreAck, ScoreAckBatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeDealer:
    """Stands in for a DEALER Channel connected to one teacher."""

    def __init__(self) -> None:
        self.sent: list = []
        self.num_rejected = 0

    def send(self, message) -> None:
        self.sent.append(message)

    def rollouts(self) -> list[str]:
        return [r.rollout_id for m in self.sent if isinstance(m, RolloutBatch) for r in m.rollouts]

    def batches(self) -> list[list[str]]:
        return [[r.rollout_id for r in m.rollouts] for m in self.sent if isinstance(m, RolloutBatch)]

    def close(self) -> None:
        pass


def rollout(rid: str) -> Rollout:
    return Rollout(rollout_id=rid, kind="train", batch_index=0, group_id=0, actor_index=0,
                   prompt_ids=np.array([1, 2], np.int32), response_ids=np.array([3], np.int32),
                   behaviour_logprobs=np.array([-0.5], np.float32),
                   token_policy_versions=np.array([0], np.int32), policy_version=0, reward=0.0,
                   finish_reason="stop")


def make_pool(n: int = 2, clock: Clock | None = None) -> TeacherPool:
    return TeacherPool(n, silence_timeout_s=10.0, heartbeat_interval_s=1.0, clock=clock or Clock())


# ---- TeacherPool ---------------------------------------------------------------------------

def test_new_work_goes_to_the_least_loaded_teacher_in_turn() -> None:
    pool = make_pool(3)
    picks = []
    for i in range(6):
        j = pool.choose()
        pool.on_send(j, f"r{i}")
        picks.append(j)
    assert picks == [0, 1, 2, 0, 1, 2]
    pool.on_reply(1, "r1")
    pool.on_reply(1, "r4")
    assert pool.choose() == 1  # now holds nothing


def test_a_retry_goes_to_a_teacher_that_did_not_have_it() -> None:
    pool = make_pool(3)
    pool.on_send(0, "r")
    assert pool.choose(exclude={0}) in (1, 2)
    assert pool.choose(exclude={0, 1}) == 2
    assert pool.choose(exclude={0, 1, 2}) in (0, 1, 2)  # all had it: any healthy one


def test_a_silent_teacher_is_marked_once_gets_no_work_and_rejoins_when_it_answers() -> None:
    clock = Clock()
    pool = make_pool(2, clock)
    pool.on_send(0, "a")
    pool.on_send(1, "b")
    clock.now += 5
    pool.on_reply(1, "b")
    assert pool.check() == []
    clock.now += 5.5  # teacher 0: 10.5 s without a word
    assert pool.check() == [0] and pool.check() == []
    assert pool.silent() == [0] and pool.healthy() == [1]
    assert [pool.choose() for _ in range(3)] == [1, 1, 1]
    assert pool.choose(exclude={1}) == 1  # the retry avoids the silent one, not the healthy one
    assert "teacher 0 SILENT 10s (1 outstanding)" in pool.describe()
    assert pool.on_reply(0, None) is True  # e.g. a heartbeat reply after SIGCONT
    assert pool.healthy() == [0, 1] and pool.num_marked_unhealthy == 1 and pool.num_rejoined == 1
    assert pool.outstanding_at(0) == ["a"]  # still awaited, on a fresh clock
    assert pool.check() == []


def test_a_busy_teacher_that_answers_anything_is_not_silent() -> None:
    clock = Clock()
    pool = make_pool(1, clock)
    pool.on_send(0, "slow")
    for _ in range(5):
        clock.now += 6
        pool.on_send(0)  # heartbeat
        pool.on_reply(0)  # its reply
        assert pool.check() == []
    assert pool.outstanding_at(0) == ["slow"]  # a lost request is the deadline's business


def test_an_idle_teacher_is_only_judged_once_something_was_sent() -> None:
    clock = Clock()
    pool = make_pool(2, clock)
    clock.now += 100
    assert pool.check() == []
    assert pool.heartbeats_due() == [0, 1]
    pool.on_send(0)
    pool.on_send(1)
    assert pool.heartbeats_due() == []
    clock.now += 1.0
    pool.on_reply(1)
    assert pool.heartbeats_due() == [0, 1]
    clock.now += 9.5
    assert pool.check() == [0]


def test_with_every_teacher_silent_the_last_heard_is_chosen() -> None:
    clock = Clock()
    pool = make_pool(3, clock)
    for j in range(3):
        pool.on_send(j, f"r{j}")
    clock.now += 2
    pool.on_reply(2)
    clock.now += 11
    assert sorted(pool.check()) == [0, 1, 2]
    assert pool.choose() == 2


def test_a_pool_needs_a_teacher() -> None:
    with pytest.raises(ValueError, match="num_teachers=0"):
        TeacherPool(0, silence_timeout_s=1, heartbeat_interval_s=0.5)


# ---- TeacherPoolClient ----------------------------------------------------------------------

def make_client(n: int = 2, **teacher) -> tuple[TeacherPoolClient, list[FakeDealer], Clock]:
    clock = Clock()
    dealers = [FakeDealer() for _ in range(n)]
    cfg = TeacherConfig(**{"request_timeout_s": 60.0, "silence_timeout_s": 10.0, "heartbeat_interval_s": 1.0,
                           **teacher})
    return TeacherPoolClient(dealers, cfg, actor_index=0, clock=clock), dealers, clock


def test_frozen_teacher_is_routed_around_and_its_rollouts_are_resent_to_the_other() -> None:
    client, dealers, clock = make_client()
    for i in range(4):
        client.send(rollout(f"r{i}"), request=f"slot{i}")
    client.flush()
    assert dealers[0].rollouts() == ["r0", "r2"] and dealers[1].rollouts() == ["r1", "r3"]
    client.tick()  # first heartbeats
    clock.now += 0.5
    client.handle(1, ScoreAck(rollout_id="r1", ok=True, policy_version=0))
    client.handle(1, Heartbeat(policy_version=0, sent_at=clock.now))
    # teacher 0 is frozen: nothing from it. Teacher 1 keeps answering heartbeats.
    for _ in range(11):
        clock.now += 1.0
        assert client.tick() == []
        client.handle(1, Heartbeat(policy_version=0, sent_at=clock.now))
    assert client.pool.silent() == [0]
    assert dealers[1].rollouts() == ["r1", "r3", "r0", "r2"]  # resent at once, not after 60 s
    assert dealers[1].batches() == [["r1", "r3"], ["r0", "r2"]]  # the resend is one frame
    assert client.num_retries == 2
    client.send(rollout("r4"), request="slot4")
    client.flush()
    assert dealers[1].rollouts()[-1] == "r4"
    for rid in ("r3", "r0", "r2", "r4"):
        client.handle(1, ScoreAck(rollout_id=rid, ok=True, policy_version=0))
    assert client.unacked == {}
    # SIGCONT: the thawed teacher acks its stale copies; it rejoins and gets work again.
    client.handle(0, ScoreAck(rollout_id="r0", ok=True, policy_version=0))
    assert client.pool.healthy() == [0, 1]
    client.send(rollout("r5"), request="slot5")
    client.flush()
    assert dealers[0].rollouts()[-1] == "r5"
    assert client.num_unscored == 0


def test_a_busy_single_teacher_keeps_its_rollouts_until_their_deadline() -> None:
    """One teacher, slow on a starved core: silence must not resend copies to it (each
    would spend a retry and end in a dropped, resampled slot); the deadline still holds."""
    client, dealers, clock = make_client(1, request_timeout_s=60.0, max_retries=1)
    for i in range(3):
        client.send(rollout(f"r{i}"), request=f"slot{i}")
    client.flush()
    for _ in range(30):
        clock.now += 1.0
        assert client.tick() == []
    assert client.pool.silent() == [0]
    assert dealers[0].rollouts() == ["r0", "r1", "r2"] and client.num_retries == 0
    client.handle(0, ScoreAck(rollout_id="r0", ok=True, policy_version=0))  # it was only busy
    assert client.pool.healthy() == [0] and set(client.unacked) == {"r1", "r2"}
    clock.now += 31.0  # r1, r2 now past their 60 s deadline: retried once, on the only teacher
    assert client.tick() == []
    assert dealers[0].rollouts() == ["r0", "r1", "r2", "r1", "r2"] and client.num_retries == 2
    clock.now += 61.0
    assert sorted(client.tick()) == ["slot1", "slot2"] and client.num_unscored == 2


def test_a_colocated_teacher_busy_training_is_never_marked_silent() -> None:
    """The learner's own teacher answers between steps of a minute or more: no silence
    verdict (it logged a warning every step of the real-model job), deadlines still hold."""
    client, dealers, clock = make_client(1, backend="colocated", request_timeout_s=900.0, max_retries=1)
    client.send(rollout("r0"), request="slot0")
    for _ in range(120):
        clock.now += 1.0
        assert client.tick() == []
    assert client.pool.silent() == [] and client.pool.healthy() == [0]
    clock.now += 800.0
    assert client.tick() == [] and client.num_retries == 1  # past request_timeout_s: resent


def test_a_failed_score_is_retried_on_the_other_teacher_then_dropped_for_resampling() -> None:
    client, dealers, clock = make_client(max_retries=1)
    client.send(rollout("r0"), request="slot0")
    client.flush()
    assert dealers[0].rollouts() == ["r0"]
    assert client.handle(0, ScoreAck(rollout_id="r0", ok=False, policy_version=0, error="boom")) == []
    assert dealers[1].rollouts() == ["r0"]
    assert client.handle(1, ScoreAck(rollout_id="r0", ok=False, policy_version=0, error="boom")) == ["slot0"]
    assert client.num_retries == 1 and client.num_unscored == 1 and client.unacked == {}


def test_deadline_retry_avoids_the_teacher_that_did_not_answer() -> None:
    client, dealers, clock = make_client(3, request_timeout_s=5.0, silence_timeout_s=30.0)
    client.send(rollout("r0"), request="slot0")
    clock.now += 6
    for j in range(3):  # all alive (heartbeats), but r0's answer was lost
        client.handle(j, Heartbeat(policy_version=0, sent_at=clock.now))
    client.tick()
    assert dealers[0].rollouts() == ["r0"] and dealers[1].rollouts() + dealers[2].rollouts() == ["r0"]


def test_on_failure_fail_names_the_teachers_tried() -> None:
    client, dealers, clock = make_client(max_retries=0, on_failure="fail")
    client.send(rollout("r0"), request="slot0")
    clock.now += 61
    with pytest.raises(RuntimeError, match=r"r0 was not scored after 1 attempts \(teachers \[0\]\)"):
        for _ in range(3):
            client.handle(1, Heartbeat(policy_version=0, sent_at=clock.now))
            client.tick()


def test_one_engine_step_leaves_as_one_batch_per_teacher() -> None:
    client, dealers, clock = make_client()
    for i in range(5):
        client.send(rollout(f"r{i}"), request=f"slot{i}")
    assert dealers[0].sent == [] and dealers[1].sent == []  # queued until the step's flush
    assert set(client.unacked) == {f"r{i}" for i in range(5)}  # deadlines run from send()
    assert client.flush() == 2
    assert dealers[0].batches() == [["r0", "r2", "r4"]] and dealers[1].batches() == [["r1", "r3"]]
    assert [m.policy_version for m in dealers[0].sent] == [0]
    assert client.flush() == 0 and len(dealers[0].sent) == 1  # nothing queued: nothing sent


def test_an_ack_batch_settles_each_rollout_on_its_own() -> None:
    client, dealers, clock = make_client(max_retries=1)
    for i in range(3):
        client.send(rollout(f"r{i}"), request=f"slot{i}")
    client.flush()
    assert dealers[0].batches() == [["r0", "r2"]] and dealers[1].batches() == [["r1"]]
    acks = ScoreAckBatch.of([ScoreAck(rollout_id="r0", ok=True, policy_version=0),
                             ScoreAck(rollout_id="r2", ok=False, policy_version=0, error="boom")])
    assert client.handle(0, acks) == []
    assert set(client.unacked) == {"r1", "r2"}  # r1 still awaited, r2 retried on the other teacher
    assert dealers[1].batches() == [["r1"], ["r2"]] and client.num_retries == 1  # sent before handle() returned
    acks = ScoreAckBatch.of([ScoreAck(rollout_id="r1", ok=True, policy_version=0),
                             ScoreAck(rollout_id="r2", ok=False, policy_version=0, error="boom")])
    assert client.handle(1, acks) == ["slot2"]  # out of retries: its slot is sampled again
    assert client.num_unscored == 1 and client.unacked == {}


def test_an_empty_ack_batch_still_shows_the_teacher_alive() -> None:
    """Every ack in it was malformed and dropped by the channel: the teacher still answered."""
    client, dealers, clock = make_client(silence_timeout_s=10.0)
    client.send(rollout("r0"), request="slot0")
    client.flush()
    clock.now += 9.0
    client.handle(0, ScoreAckBatch.of([]))
    clock.now += 9.0
    client.tick()
    assert client.pool.silent() == [] and set(client.unacked) == {"r0"}


def test_heartbeats_go_to_every_teacher_each_interval() -> None:
    client, dealers, clock = make_client()
    client.tick()
    client.tick()
    assert [sum(isinstance(m, Heartbeat) for m in d.sent) for d in dealers] == [1, 1]
    clock.now += 1.0
    client.tick()
    assert [sum(isinstance(m, Heartbeat) for m in d.sent) for d in dealers] == [2, 2]


def test_a_silence_timeout_below_the_heartbeat_interval_is_refused() -> None:
    from asyncopd.config import ConfigError

    with pytest.raises(ConfigError, match="teacher.silence_timeout_s"):
        TeacherConfig(silence_timeout_s=1.0, heartbeat_interval_s=2.0)
