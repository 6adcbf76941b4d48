"""The teacher pool routes around a frozen (SIGSTOP) or killed teacher, with real
teacher processes and real ZeroMQ on loopback; a thawed teacher rejoins the pool."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
import zmq

from asyncopd.actor.teachers import TeacherPoolClient
from asyncopd.buffer import StalenessBuffer
from asyncopd.config import TeacherConfig
from asyncopd.transport.sockets import Channel
from asyncopd.types import Rollout, ScoredBatch, ScoredRollout, Shutdown

pytestmark = pytest.mark.distributed


class _ZeroScorer:
    """A stand-in scorer with the real method name."""

    def score(self, rollouts):
        from asyncopd.teacher.scorer import TeacherScore

        return [TeacherScore(logprobs=np.zeros(r.response_ids.shape[0], np.float32)) for r in rollouts]


def _teacher_process(index: int, to_test: mp.Queue, from_test: mp.Queue) -> None:
    from asyncopd.teacher.worker import TeacherWorker

    worker = TeacherWorker(_ZeroScorer(), index=index, host="127.0.0.1", max_batch_tokens=256)
    to_test.put((index, worker.router.address, worker.inbox.address))
    worker.connect_learner(from_test.get(timeout=60))
    while worker.serve_once(0.1):
        pass
    worker.close()


def rollout(i: int) -> Rollout:
    return Rollout(rollout_id=f"0-{i}", kind="train", batch_index=0, group_id=i, actor_index=0,
                   prompt_ids=np.array([5, 6, 7], np.int32), response_ids=np.array([8, 9], np.int32),
                   behaviour_logprobs=np.zeros(2, np.float32), token_policy_versions=np.zeros(2, np.int32),
                   policy_version=0, reward=0.0, finish_reason="stop")


def pump(client: TeacherPoolClient, learner: Channel, scored: list[ScoredRollout], seconds: float,
         until=lambda: False) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until():
        for j, dealer in enumerate(client.dealers):
            while (got := dealer.recv(timeout_s=0.0)) is not None:
                assert client.handle(j, got[1]) == []
        assert client.tick() == []
        while (got := learner.recv(timeout_s=0.01)) is not None:
            assert isinstance(got[1], ScoredBatch)
            scored += got[1].scored


@pytest.mark.parametrize("fault", ["sigstop", "sigkill"])
def test_work_completes_on_the_other_teacher_and_a_thawed_one_rejoins(fault: str) -> None:
    ctx = mp.get_context("spawn")
    to_test, from_test = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_teacher_process, args=(i, to_test, from_test)) for i in range(2)]
    for p in procs:
        p.start()
    learner = Channel(zmq.PULL, bind_host="127.0.0.1")
    channels = [learner]
    try:
        endpoints = sorted(to_test.get(timeout=120) for _ in procs)
        for _ in procs:
            from_test.put(learner.address)
        dealers = [Channel(zmq.DEALER, connect=[e[1]], identity=b"actor-0") for e in endpoints]
        controls = [Channel(zmq.PUSH, connect=[e[2]]) for e in endpoints]
        channels += dealers + controls
        cfg = TeacherConfig(request_timeout_s=60.0, max_retries=2, heartbeat_interval_s=0.2, silence_timeout_s=1.5)
        client = TeacherPoolClient(dealers, cfg, actor_index=0)
        scored: list[ScoredRollout] = []
        pump(client, learner, scored, 10.0, until=lambda: client.pool.teachers[0].last_heartbeat is not None
             and not any(t.waiting_since for t in client.pool.teachers))  # both answer heartbeats

        os.kill(procs[0].pid, signal.SIGSTOP if fault == "sigstop" else signal.SIGKILL)
        start = time.monotonic()
        for i in range(40):
            client.send(rollout(i), request=i)
        pump(client, learner, scored, 30.0, until=lambda: not client.unacked)
        took_s = time.monotonic() - start
        assert not client.unacked and client.num_unscored == 0
        assert took_s < 15, "rerouted by silence (1.5 s), long before request_timeout_s (60 s)"
        assert client.pool.silent() == [0] and client.pool.num_marked_unhealthy == 1
        assert {s.rollout_id for s in scored} == {f"0-{i}" for i in range(40)}
        assert {s.teacher_index for s in scored} == {1}
        assert client.num_retries == 20  # exactly the rollouts teacher 0 held, each resent once

        if fault == "sigstop":
            os.kill(procs[0].pid, signal.SIGCONT)
            pump(client, learner, scored, 15.0, until=lambda: client.pool.healthy() == [0, 1])
            assert client.pool.healthy() == [0, 1] and client.pool.num_rejoined == 1
            for i in range(40, 50):
                client.send(rollout(i), request=i)
            pump(client, learner, scored, 15.0, until=lambda: not client.unacked)
            assert not client.unacked
            assert {s.rollout_id for s in scored if s.teacher_index == 0} >= {f"0-{i}" for i in range(40, 50, 2)}
            # The thawed teacher scored its 20 stranded rollouts late: the buffer refuses those copies.
            pump(client, learner, scored, 1.0)
            buffer: StalenessBuffer = StalenessBuffer(batch_size=50, max_staleness=1, capacity=100)
            kept = sum(buffer.put(s, 0) for s in scored)
            assert kept == 50 and buffer.stats.duplicates == len(scored) - 50 == 20
            assert len(buffer.next_batch(0)) == 50
        for control in controls:
            control.send(Shutdown(policy_version=0, reason="test over"))
        procs[1].join(timeout=30)
        assert procs[1].exitcode == 0
        if fault == "sigstop":
            procs[0].join(timeout=30)
            assert procs[0].exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
        for channel in channels:
            channel.close()
