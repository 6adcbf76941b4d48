"""teacher.supervise_scorer: a scorer process that crashes or hangs is restarted, the
batch it held fails (the worker acks it as failed), and the next batch is scored."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import zmq

from asyncopd.teacher.supervised import ScorerError, ScorerRestarted, SupervisedScorer
from asyncopd.types import Rollout, ScoreAck, ScoredBatch

pytestmark = pytest.mark.distributed


class _Scorer:
    """Scores zeros; rollout "crash" kills the process, "hang" never returns, "raise" raises."""

    def score(self, rollouts):
        from asyncopd.teacher.scorer import TeacherScore

        ids = {r.rollout_id for r in rollouts}
        if "crash" in ids:
            os._exit(9)  # as the OOM killer or a CUDA abort would
        if "hang" in ids:
            time.sleep(3600)
        if "raise" in ids:
            raise ValueError("bad batch")
        return [TeacherScore(logprobs=np.full(r.response_ids.shape[0], -1.5, np.float32)) for r in rollouts]


class _Factory:
    def __call__(self):
        return _Scorer()


def rollout(rid: str) -> Rollout:
    return Rollout(rollout_id=rid, kind="train", batch_index=0, group_id=0, actor_index=0,
                   prompt_ids=np.array([5, 6], np.int32), response_ids=np.array([8, 9, 10], np.int32),
                   behaviour_logprobs=np.zeros(3, np.float32), token_policy_versions=np.zeros(3, np.int32),
                   policy_version=0, reward=0.0, finish_reason="stop")


def test_a_crashed_or_hung_scorer_is_restarted_and_the_next_batch_scored() -> None:
    scorer = SupervisedScorer(_Factory(), timeout_s=2.0, startup_timeout_s=60.0)
    try:
        first = scorer._process.pid
        scores = scorer.score([rollout("a"), rollout("b")])
        np.testing.assert_array_equal(scores[1].logprobs, np.full(3, -1.5, np.float32))
        with pytest.raises(ScorerRestarted, match=r"died while scoring \(exit code 9\)"):
            scorer.score([rollout("crash")])
        assert scorer.num_restarts == 1 and scorer._process.pid != first
        assert len(scorer.score([rollout("c")])) == 1
        with pytest.raises(ScorerRestarted, match="no answer within teacher.request_timeout_s=2s"):
            scorer.score([rollout("hang")])
        with pytest.raises(ScorerError, match="ValueError: bad batch"):
            scorer.score([rollout("raise")])
        assert scorer.num_restarts == 2  # an exception is not a crash: same process
        assert len(scorer.score([rollout("d")])) == 1
    finally:
        scorer.close()


def test_a_crash_loop_ends_the_job() -> None:
    scorer = SupervisedScorer(_Factory(), timeout_s=5.0, startup_timeout_s=60.0, max_restarts=1)
    try:
        with pytest.raises(ScorerRestarted):
            scorer.score([rollout("crash")])
        with pytest.raises(RuntimeError, match="failed 2 times within 600s"):
            scorer.score([rollout("crash")])
    finally:
        scorer.close()


def test_the_teacher_worker_acks_the_crashed_batch_as_failed_and_keeps_serving() -> None:
    from asyncopd.teacher.worker import TeacherWorker
    from asyncopd.transport.sockets import Channel

    scorer = SupervisedScorer(_Factory(), timeout_s=5.0, startup_timeout_s=60.0)
    worker = TeacherWorker(scorer, index=0, host="127.0.0.1", max_batch_tokens=4096)
    learner = Channel(zmq.PULL, bind_host="127.0.0.1")
    worker.connect_learner(learner.address)
    dealer = Channel(zmq.DEALER, connect=[worker.router.address], identity=b"actor-0")
    try:
        acks: dict[str, ScoreAck] = {}
        for rid in ("crash", "ok"):
            dealer.send(rollout(rid))
            deadline = time.monotonic() + 60
            while rid not in acks and time.monotonic() < deadline:
                worker.serve_once(0.05)
                while (got := dealer.recv(timeout_s=0.0)) is not None:
                    acks.update((a.rollout_id, a) for a in got[1].acks)
        assert not acks["crash"].ok and "ScorerRestarted" in acks["crash"].error
        assert acks["ok"].ok
        got = learner.recv(timeout_s=5.0)
        assert isinstance(got[1], ScoredBatch) and [s.rollout_id for s in got[1].scored] == ["ok"]
    finally:
        worker.close()
        dealer.close()
        learner.close()
        scorer.close()
