"""Held-out evaluation results, gathered on learner rank 0.

Actors sample every held-out prompt at an eval version greedily once (accuracy =
mean verifier reward) and ``eval.rkl_samples`` times at temperature 1 (reverse KL
= mean over sampled tokens of ``lp_student - lp_teacher``, the Monte-Carlo
estimate of the per-token reverse KL to the teacher). Pure bookkeeping: no I/O.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from asyncopd.types import ScoredRollout

__all__ = ["EvalAccumulator"]


class EvalAccumulator:
    def __init__(self, num_prompts: int, rkl_samples: int = 1) -> None:
        self.expected = num_prompts * (1 + rkl_samples)
        self._results: dict[int, list[ScoredRollout]] = defaultdict(list)
        self._seen: set[str] = set()
        self.completed: dict[int, dict[str, float]] = {}

    def add(self, scored: ScoredRollout) -> dict[str, float] | None:
        """Record one eval sample; returns the version's metrics once it is complete."""
        rollout = scored.rollout
        if rollout.rollout_id in self._seen:
            return None
        self._seen.add(rollout.rollout_id)
        version = rollout.batch_index
        results = self._results[version]
        results.append(scored)
        if len(results) < self.expected:
            return None
        results.sort(key=lambda s: s.rollout.rollout_id)  # arrival order is timing; sums must not be
        greedy = [s.rollout.reward for s in results if s.rollout.kind == "eval_greedy"]
        sampled = [s for s in results if s.rollout.kind == "eval_sample"]
        rkl_tokens = np.concatenate(
            [s.rollout.behaviour_logprobs - s.teacher_logprobs for s in sampled]
        ) if sampled else np.zeros(0)
        metrics = {
            "eval/policy_version": version,
            "eval/accuracy": float(np.mean(greedy)) if greedy else float("nan"),
            "eval/sample_accuracy": float(np.mean([s.rollout.reward for s in sampled])) if sampled else float("nan"),
            "eval/rkl": float(rkl_tokens.mean()) if rkl_tokens.size else float("nan"),
            "eval/response_tokens": float(np.mean([s.rollout.response_ids.shape[0] for s in sampled])) if sampled else 0.0,
        }
        self.completed[version] = metrics
        del self._results[version]
        return metrics

    def pending(self, version: int) -> bool:
        return version not in self.completed
