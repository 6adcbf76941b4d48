"""Learner rank 0's rollout socket with an in-process teacher (teacher.backend=colocated),
over real ZeroMQ on loopback with a fake rendezvous and a fake scorer: training
rollouts reach the buffer unscored and are acknowledged at once, evaluation rollouts
are scored and complete an evaluation, a failing scorer is acknowledged as a failure;
a RolloutBatch is acknowledged in ScoreAckBatches, per rollout."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from asyncopd.buffer import StalenessBuffer
from asyncopd.config import from_dict
from asyncopd.learner.evaluation import EvalAccumulator
from asyncopd.learner.io import LearnerIO
from asyncopd.transport.sockets import Channel
from asyncopd.types import Rollout, RolloutBatch, ScoreAck, ScoreAckBatch


class FakeRendezvous:
    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def publish(self, key: str, value: str) -> None:
        self.values[key] = value

    def lookup(self, key: str) -> str:
        return self.values[key]


def rollout(i: int, kind: str) -> Rollout:
    return Rollout(rollout_id=f"0-{i}", kind=kind, batch_index=0, group_id=i, actor_index=0,
                   prompt_ids=np.array([3, 4], np.int32), response_ids=np.array([5, 6, 7], np.int32),
                   behaviour_logprobs=np.full(3, -1.0, np.float32), token_policy_versions=np.zeros(3, np.int32),
                   policy_version=0, reward=1.0, finish_reason="stop")


@pytest.fixture
def setup():
    cfg = from_dict({"teacher": {"backend": "colocated"}, "cluster": {"teachers": 0},
                     "loss": {"kl_loss": "full", "pg_coef": 0.0}, "learner": {"batch_size": 2}})
    rendezvous = FakeRendezvous()
    actor_inbox = Channel(zmq.PULL, bind_host="127.0.0.1")
    rendezvous.publish("actor/0/inbox", actor_inbox.address)
    calls: list[int] = []
    evals: list[dict] = []

    def score(rollouts):
        calls.append(len(rollouts))
        if any(r.rollout_id == "0-99" for r in rollouts):
            raise RuntimeError("teacher out of memory")
        return [np.full(r.response_ids.shape[0], -1.5, np.float32) for r in rollouts]

    io = LearnerIO(cfg, rendezvous, buffer=StalenessBuffer(batch_size=2, max_staleness=1, capacity=8),
                   evaluation=EvalAccumulator(1, rkl_samples=1), on_eval=evals.append, score=score)
    actor = Channel(zmq.DEALER, connect=[rendezvous.lookup("learner/rollouts")], identity=b"actor-0")
    yield io, actor, calls, evals
    actor.close()
    actor_inbox.close()
    io.close()


def acks(actor: Channel, count: int, frames: list | None = None) -> list[ScoreAck]:
    """The acks the actor received (ScoreAckBatches unpacked), each frame in ``frames``."""
    got = []
    deadline = time.monotonic() + 5.0
    while len(got) < count and time.monotonic() < deadline:
        received = actor.recv(timeout_s=0.1)
        if received is not None:
            assert isinstance(received[1], ScoreAckBatch)
            got += received[1].acks
            if frames is not None:
                frames.append(received[1])
    return got


def test_train_rollouts_are_buffered_unscored_and_evals_are_scored(setup) -> None:
    io, actor, calls, evals = setup
    actor.send(RolloutBatch.of([rollout(i, kind) for i, kind in enumerate(["train", "eval_greedy", "train",
                                                                           "eval_sample"])]))
    batch = None
    deadline = time.monotonic() + 5.0
    while (batch is None or not evals) and time.monotonic() < deadline:
        io.pump(0.05, 0)
        batch = batch or io.buffer.next_batch(0)
    assert batch is not None and sorted(s.rollout_id for s in batch) == ["0-0", "0-2"]
    assert all(np.isnan(s.teacher_logprobs).all() and s.teacher_index == -1 for s in batch)
    assert sum(calls) == 2  # only the evaluation rollouts were scored on arrival
    assert evals and evals[0]["eval/rkl"] == pytest.approx(0.5)  # behaviour -1.0 minus teacher -1.5
    frames: list[ScoreAckBatch] = []
    received = acks(actor, 4, frames)
    assert sorted(a.rollout_id for a in received) == ["0-0", "0-1", "0-2", "0-3"] and all(a.ok for a in received)
    # One batch in, two frames back: the training rollouts' acks at once, the evaluations' after scoring.
    assert [sorted(a.rollout_id for a in f.acks) for f in frames] == [["0-0", "0-2"], ["0-1", "0-3"]]


def test_a_failing_scorer_acknowledges_the_evals_as_failed(setup) -> None:
    io, actor, _, evals = setup
    actor.send(rollout(99, "eval_sample"))  # a lone Rollout (an older actor) is a batch of one
    received: list[ScoreAck] = []
    deadline = time.monotonic() + 5.0
    while not received and time.monotonic() < deadline:
        io.pump(0.05, 0)
        received = acks(actor, 1)
    assert len(received) == 1 and not received[0].ok and "teacher out of memory" in received[0].error
    assert not evals
