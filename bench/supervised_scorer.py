"""What does teacher.supervise_scorer=true cost per scoring batch?

Scores the same batches with an HF scorer (a tiny random model, or --teacher PATH)
in this process and through :class:`~asyncopd.teacher.supervised.SupervisedScorer`
(its child process, batches and scores through a pipe in msgpack), and with a
scorer that returns zeros (the pipe alone). Prints ms per batch and, last,
``supervised_scorer overhead <ms per batch> ratio <supervised / in-process>``.

Usage: python bench/supervised_scorer.py [--batches N] [--rollouts R] [--tokens T] [--teacher PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from asyncopd.teacher.supervised import HFScorerFactory, SupervisedScorer
from asyncopd.types import Rollout


class ZeroFactory:
    def __call__(self):
        return ZeroScorer()


class ZeroScorer:
    def score(self, rollouts):
        from asyncopd.teacher.scorer import TeacherScore

        return [TeacherScore(logprobs=np.zeros(r.response_ids.shape[0], np.float32)) for r in rollouts]


def batches(num: int, rollouts: int, tokens: int, vocab: int) -> list[list[Rollout]]:
    rng = np.random.default_rng(0)
    out = []
    for b in range(num):
        batch = []
        for i in range(rollouts):
            n = tokens // 2
            batch.append(Rollout(
                rollout_id=f"{b}-{i}", kind="train", batch_index=0, group_id=i, actor_index=0,
                prompt_ids=rng.integers(3, vocab, size=tokens - n).astype(np.int32),
                response_ids=rng.integers(3, vocab, size=n).astype(np.int32),
                behaviour_logprobs=np.zeros(n, np.float32), token_policy_versions=np.zeros(n, np.int32),
                policy_version=0, reward=0.0, finish_reason="stop"))
        out.append(batch)
    return out


def ms_per_batch(scorer, work: list[list[Rollout]]) -> float:
    scorer.score(work[0])  # warm up
    start = time.perf_counter()
    for batch in work:
        scorer.score(batch)
    return (time.perf_counter() - start) / len(work) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=256, help="prompt+response tokens per rollout")
    parser.add_argument("--teacher", default=None, help="a teacher model directory (default: a tiny random one)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as the child (HFScorerFactory threads=1, cluster.teacher_threads' default)
    with tempfile.TemporaryDirectory() as scratch:
        path = args.teacher
        if path is None:
            from asyncopd.tasks.tiny import save_tiny_model

            path = str(save_tiny_model(Path(scratch) / "teacher", seed=0))
        factory = HFScorerFactory(path, "float32", 0)
        work = batches(args.batches, args.rollouts, args.tokens, vocab=64)
        local = ms_per_batch(factory(), work)
        supervised_scorer = SupervisedScorer(factory, timeout_s=600, startup_timeout_s=600)
        supervised = ms_per_batch(supervised_scorer, work)
        supervised_scorer.close()
        pipe_scorer = SupervisedScorer(ZeroFactory(), timeout_s=600, startup_timeout_s=600)
        pipe = ms_per_batch(pipe_scorer, work)
        pipe_scorer.close()
    print(f"in-process HF scorer   {local:8.2f} ms/batch ({args.rollouts} rollouts x {args.tokens} tokens)")
    print(f"supervised HF scorer   {supervised:8.2f} ms/batch")
    print(f"pipe alone (zeros)     {pipe:8.2f} ms/batch")
    print(f"supervised_scorer overhead {supervised - local:.2f} ms/batch ratio {supervised / local:.3f}")


if __name__ == "__main__":
    main()
