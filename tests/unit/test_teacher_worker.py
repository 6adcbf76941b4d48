"""The teacher worker's batching, over real ZeroMQ on loopback with a fake scorer (the
real method name): rollouts of several actors arrive as RolloutBatches; per scoring
forward the learner gets one ScoredBatch and each actor one ScoreAckBatch with only its
own rollouts; a failed forward is acknowledged as failed, per rollout; a lone Rollout
(an older actor) still works."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from asyncopd.teacher.scorer import TeacherScore
from asyncopd.teacher.worker import TeacherWorker
from asyncopd.transport.sockets import Channel
from asyncopd.types import Rollout, RolloutBatch, ScoreAckBatch, ScoredBatch


class FakeScorer:
    """Scores each token -1; fails any forward holding a rollout whose id ends in "!"."""

    def __init__(self) -> None:
        self.forwards: list[list[str]] = []

    def score(self, rollouts):
        self.forwards.append(sorted(r.rollout_id for r in rollouts))
        if any(r.rollout_id.endswith("!") for r in rollouts):
            raise RuntimeError("teacher out of memory")
        return [TeacherScore(logprobs=np.full(r.response_ids.shape[0], -1.0, np.float32)) for r in rollouts]


def rollout(rid: str, actor: int, num_tokens: int, version: int = 2) -> Rollout:
    n = num_tokens - 2
    return Rollout(rollout_id=rid, kind="train", batch_index=0, group_id=0, actor_index=actor,
                   prompt_ids=np.array([1, 2], np.int32), response_ids=np.full(n, 3, np.int32),
                   behaviour_logprobs=np.zeros(n, np.float32), token_policy_versions=np.full(n, version, np.int32),
                   policy_version=version, reward=0.0, finish_reason="stop")


@pytest.fixture
def teacher():
    scorer = FakeScorer()
    # 45 tokens per forward (rows x longest): a 20- and a 15-token rollout fit, a third does not.
    worker = TeacherWorker(scorer, index=3, host="127.0.0.1", max_batch_tokens=45)
    learner = Channel(zmq.PULL, bind_host="127.0.0.1")
    worker.connect_learner(learner.address)
    actors = [Channel(zmq.DEALER, connect=[worker.router.address], identity=f"actor-{i}".encode())
              for i in range(2)]
    yield worker, scorer, learner, actors
    for channel in (*actors, learner):
        channel.close()
    worker.close()


def collect(channel: Channel, count: int) -> list:
    """``count`` messages from ``channel`` (fewer if they do not come within 5 s)."""
    got = []
    deadline = time.monotonic() + 5.0
    while len(got) < count and time.monotonic() < deadline:
        if (received := channel.recv(timeout_s=0.05)) is not None:
            got.append(received[1])
    return got


def serve_until(worker: TeacherWorker, scorer: FakeScorer, num_rollouts: int) -> None:
    deadline = time.monotonic() + 5.0
    while sum(map(len, scorer.forwards)) < num_rollouts and time.monotonic() < deadline:
        worker.serve_once(0.05)


def test_one_scored_batch_per_forward_and_one_ack_batch_per_actor_and_forward(teacher) -> None:
    worker, scorer, learner, actors = teacher
    actors[0].send(RolloutBatch.of([rollout("a0", 0, 20), rollout("a1", 0, 10, version=1)]))
    time.sleep(0.1)
    actors[1].send(RolloutBatch.of([rollout("b0", 1, 15)]))
    time.sleep(0.2)  # both batches queued: one drain takes them (45 tokens)
    serve_until(worker, scorer, 3)
    assert scorer.forwards == [["a0", "b0"], ["a1"]]  # longest first, two forwards mixing the actors
    to_learner = collect(learner, 2)
    assert all(isinstance(m, ScoredBatch) for m in to_learner)
    assert [s.rollout_id for m in to_learner for s in m.scored] == [r for f in scorer.forwards for r in f]
    assert {s.teacher_index for m in to_learner for s in m.scored} == {3}
    assert [m.policy_version for m in to_learner] == [2, 1]  # the oldest rollout in each
    # Per forward, one frame to each actor that had rollouts in it, naming only its own.
    acks = collect(actors[0], 2)
    assert all(isinstance(m, ScoreAckBatch) for m in acks)
    assert [[a.rollout_id for a in m.acks] for m in acks] == [["a0"], ["a1"]]
    assert [[a.rollout_id for a in m.acks] for m in collect(actors[1], 1)] == [["b0"]]
    assert actors[0].recv(timeout_s=0.2) is None and actors[1].recv(timeout_s=0.0) is None
    assert all(a.ok for m in acks for a in m.acks)
    assert worker.num_scored == 3 and worker.num_failed == 0


def test_a_failed_forward_is_acknowledged_as_failed_rollout_by_rollout(teacher) -> None:
    worker, scorer, learner, actors = teacher
    actors[0].send(RolloutBatch.of([rollout("ok", 0, 30), rollout("bad!", 0, 30)]))  # two forwards
    serve_until(worker, scorer, 2)
    acks = collect(actors[0], 2)
    by_id = {a.rollout_id: a for m in acks for a in m.acks}
    assert by_id["ok"].ok and not by_id["bad!"].ok and "teacher out of memory" in by_id["bad!"].error
    scored = collect(learner, 1)
    assert [s.rollout_id for m in scored for s in m.scored] == ["ok"]
    assert learner.recv(timeout_s=0.2) is None  # nothing forwarded for the failure
    assert worker.num_scored == 1 and worker.num_failed == 1


def test_a_lone_rollout_from_an_older_actor_is_a_batch_of_one(teacher) -> None:
    worker, scorer, learner, actors = teacher
    actors[1].send(rollout("solo", 1, 10))
    serve_until(worker, scorer, 1)
    (scored,) = collect(learner, 1)
    (acks,) = collect(actors[1], 1)
    assert [s.rollout_id for s in scored.scored] == ["solo"] and [a.rollout_id for a in acks.acks] == ["solo"]
