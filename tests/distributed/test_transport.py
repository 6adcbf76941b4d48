"""Transport across real processes: the bucketed weight broadcast on a stateless gloo
group, and the ZeroMQ teacher pool with two workers on loopback."""

from __future__ import annotations

import multiprocessing as mp
import socket
import time
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist
import zmq

from asyncopd.transport.sockets import Channel
from asyncopd.transport.weights import WeightGroup, broadcast_weights, plan_buckets, receive_weights
from asyncopd.types import (Rollout, RolloutBatch, ScoreAckBatch, ScoredBatch, ScoredRollout, Shutdown, TensorSpec,
                            WeightUpdate)

pytestmark = pytest.mark.distributed

SPECS = [TensorSpec("a", (4, 3), "float32"), TensorSpec("b", (5,), "float32"), TensorSpec("c", (2, 2, 2), "float32"),
         TensorSpec("d", (7,), "bfloat16")]


def expected_tensor(spec: TensorSpec, version: int) -> torch.Tensor:
    numel = int(np.prod(spec.shape))
    dtype = torch.bfloat16 if spec.dtype == "bfloat16" else torch.float32
    return (torch.arange(numel, dtype=torch.float32) * (version + 1)).reshape(spec.shape).to(dtype)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights_member(rank: int, size: int, port: int, mode: str, out: mp.Queue) -> None:
    try:
        store = dist.TCPStore("127.0.0.1", port, size, is_master=False, timeout=timedelta(seconds=30))
        group = WeightGroup(store, rank, size, timeout_s=3.0)
        update = WeightUpdate(policy_version=7, buckets=plan_buckets(SPECS, bucket_bytes=64))
        if rank == 0:
            if mode == "ok":
                broadcast_weights(group, update, ((s.name, expected_tensor(s, 7)) for s in SPECS))
            else:
                time.sleep(8)  # never joins: the receivers must fail, not hang
            out.put((rank, "sent"))
        else:
            got = dict(receive_weights(group, update))
            ok = all(torch.equal(got[s.name], expected_tensor(s, 7)) for s in SPECS)
            out.put((rank, "ok" if ok else "mismatch"))
    except Exception as exc:  # reported to the test
        out.put((rank, f"error: {type(exc).__name__}"))


def run_weight_group(mode: str) -> dict[int, str]:
    ctx = mp.get_context("spawn")
    port = free_port()
    master = dist.TCPStore("127.0.0.1", port, 4, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=30))
    out = ctx.Queue()
    procs = [ctx.Process(target=_weights_member, args=(r, 3, port, mode, out)) for r in range(3)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    del master
    return results


def test_plan_buckets_respects_size_and_dtype() -> None:
    buckets = plan_buckets(SPECS, bucket_bytes=64)
    assert [[s.name for s in b] for b in buckets] == [["a"], ["b", "c"], ["d"]]


def test_weights_reach_every_actor_exactly() -> None:
    assert run_weight_group("ok") == {0: "sent", 1: "ok", 2: "ok"}


def test_a_sync_that_cannot_complete_fails_instead_of_hanging() -> None:
    start = time.monotonic()
    results = run_weight_group("sender_missing")
    assert results[1].startswith("error") and results[2].startswith("error")
    assert time.monotonic() - start < 45


# ---- teacher pool ----------------------------------------------------------------------------

def _teacher_process(model_path: str, index: int, to_test: mp.Queue, from_test: mp.Queue) -> None:
    from asyncopd.teacher.scorer import HFScorer
    from asyncopd.teacher.worker import TeacherWorker

    torch.set_num_threads(1)
    worker = TeacherWorker(HFScorer(model_path), index=index, host="127.0.0.1", max_batch_tokens=256)
    to_test.put((index, worker.router.address, worker.inbox.address))
    worker.connect_learner(from_test.get(timeout=60))
    while worker.serve_once(0.1):
        pass
    worker.close()


def make_rollout(i: int, rng: np.random.Generator) -> Rollout:
    n = int(rng.integers(1, 6))
    return Rollout(rollout_id=f"0-{i}", kind="train", batch_index=0, group_id=i, actor_index=0,
                   prompt_ids=rng.integers(3, 90, size=int(rng.integers(1, 8))).astype(np.int32),
                   response_ids=rng.integers(3, 90, size=n).astype(np.int32),
                   behaviour_logprobs=np.zeros(n, np.float32), token_policy_versions=np.zeros(n, np.int32),
                   policy_version=0, reward=0.0, finish_reason="stop")


def test_teacher_pool_of_two_scores_every_rollout(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from asyncopd.tasks.tiny import save_tiny_model

    model_path = str(save_tiny_model(tmp_path / "teacher", seed=3))
    ctx = mp.get_context("spawn")
    to_test, from_test = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_teacher_process, args=(model_path, i, to_test, from_test)) for i in range(2)]
    for p in procs:
        p.start()
    learner = Channel(zmq.PULL, bind_host="127.0.0.1")
    try:
        endpoints = sorted(to_test.get(timeout=120) for _ in procs)
        for _ in procs:
            from_test.put(learner.address)
        dealer = Channel(zmq.DEALER, connect=[e[1] for e in endpoints], identity=b"actor-0")
        controls = [Channel(zmq.PUSH, connect=[e[2]]) for e in endpoints]
        time.sleep(0.5)  # let the DEALER finish connecting to both workers, so both get work
        # A stranger's bytes on a teacher socket are rejected, not fatal.
        stranger = Channel(zmq.DEALER, connect=[endpoints[0][1]])
        stranger.socket.send(b"not a message")
        rng = np.random.default_rng(0)
        rollouts = [make_rollout(i, rng) for i in range(24)]
        for i in range(0, len(rollouts), 4):  # the DEALER spreads the batches over both teachers
            dealer.send(RolloutBatch.of(rollouts[i:i + 4]))
        scored: dict[str, ScoredRollout] = {}
        acks: set[str] = set()
        deadline = time.monotonic() + 60
        while (len(scored) < len(rollouts) or len(acks) < len(rollouts)) and time.monotonic() < deadline:
            if (got := learner.recv(timeout_s=0.1)) is not None:
                assert isinstance(got[1], ScoredBatch)
                scored.update((s.rollout_id, s) for s in got[1].scored)
            while (ack := dealer.recv(timeout_s=0.0)) is not None:
                assert isinstance(ack[1], ScoreAckBatch) and all(a.ok for a in ack[1].acks)
                acks.update(a.rollout_id for a in ack[1].acks)
        assert len(scored) == len(rollouts) and len(acks) == len(rollouts)
        assert {s.teacher_index for s in scored.values()} == {0, 1}
        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        for r in rollouts[:6]:
            ids = torch.from_numpy(np.concatenate([r.prompt_ids, r.response_ids]).astype(np.int64))[None]
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            p = r.prompt_ids.shape[0]
            want = logp[p - 1:-1].gather(1, ids[0, p:, None]).squeeze(1).numpy()
            np.testing.assert_allclose(scored[r.rollout_id].teacher_logprobs, want, atol=1e-5)
        for control in controls:
            control.send(Shutdown(policy_version=0, reason="test over"))
        for p in procs:
            p.join(timeout=30)
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        learner.close()


class _RecordingScorer:
    """A stand-in scorer with the real method name: records each forward's rollouts."""

    def __init__(self) -> None:
        self.forwards: list[list[str]] = []

    def score(self, rollouts):
        from asyncopd.teacher.scorer import TeacherScore

        self.forwards.append([r.rollout_id for r in rollouts])
        return [TeacherScore(logprobs=np.zeros(r.response_ids.shape[0], np.float32)) for r in rollouts]


@pytest.mark.parametrize(("batch_wait_s", "expected"), [(0.0, [["0-0"], ["0-1"]]), (0.5, [["0-0", "0-1"]])])
def test_teacher_batch_wait_collects_later_rollouts_into_one_forward(batch_wait_s, expected) -> None:
    import threading

    from asyncopd.teacher.worker import TeacherWorker

    scorer = _RecordingScorer()
    worker = TeacherWorker(scorer, index=0, host="127.0.0.1", max_batch_tokens=4096, batch_wait_s=batch_wait_s)
    learner = Channel(zmq.PULL, bind_host="127.0.0.1")
    worker.connect_learner(learner.address)
    dealer = Channel(zmq.DEALER, connect=[worker.router.address], identity=b"actor-0")
    try:
        rng = np.random.default_rng(0)
        first, second = make_rollout(0, rng), make_rollout(1, rng)
        dealer.send(first)
        later = threading.Timer(0.15, dealer.send, args=(second,))
        later.start()
        deadline = time.monotonic() + 10
        while sum(len(f) for f in scorer.forwards) < 2 and time.monotonic() < deadline:
            worker.serve_once(0.05)
        later.join()
        assert sorted(sorted(f) for f in scorer.forwards) == expected
    finally:
        worker.close()
        dealer.close()
        learner.close()
