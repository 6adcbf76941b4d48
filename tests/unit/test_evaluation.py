"""Held-out evaluation bookkeeping: completion count, accuracy and the RKL estimate."""

from __future__ import annotations

import numpy as np
import pytest

from asyncopd.learner.evaluation import EvalAccumulator
from asyncopd.types import Rollout, ScoredRollout


def _scored(rollout_id: str, kind: str, reward: float, behaviour: list[float], teacher: list[float],
            version: int = 3) -> ScoredRollout:
    n = len(behaviour)
    rollout = Rollout(rollout_id=rollout_id, kind=kind, batch_index=version, group_id=0, actor_index=0,
                      prompt_ids=np.array([1, 2], np.int32), response_ids=np.arange(n, dtype=np.int32),
                      behaviour_logprobs=np.array(behaviour, np.float32),
                      token_policy_versions=np.full(n, version, np.int32), policy_version=version,
                      reward=reward, finish_reason="stop")
    return ScoredRollout(rollout=rollout, teacher_logprobs=np.array(teacher, np.float32), teacher_index=0,
                         score_s=0.0, policy_version=version)


def test_completes_after_one_greedy_and_rkl_samples_per_prompt() -> None:
    acc = EvalAccumulator(num_prompts=2, rkl_samples=2)
    items = [
        _scored("g0", "eval_greedy", 1.0, [-0.1], [-0.1]),
        _scored("g1", "eval_greedy", 0.0, [-0.1], [-0.1]),
        _scored("s0", "eval_sample", 1.0, [-1.0, -2.0], [-2.0, -2.0]),
        _scored("s1", "eval_sample", 0.0, [-1.0], [-3.0]),
        _scored("s2", "eval_sample", 0.0, [-0.5], [-0.5]),
    ]
    for item in items:
        assert acc.add(item) is None
    assert acc.add(items[0]) is None  # a duplicate does not count
    metrics = acc.add(_scored("s3", "eval_sample", 1.0, [-1.0], [-1.0]))
    assert metrics is not None and not acc.pending(3)
    assert metrics["eval/accuracy"] == 0.5
    assert metrics["eval/sample_accuracy"] == 0.5
    # Token mean of lp_student - lp_teacher over the 5 sampled tokens: (1 + 0 + 2 + 0 + 0) / 5.
    assert metrics["eval/rkl"] == pytest.approx(0.6)
