"""What the learner logs about the samples of one batch (``batch/*``, ``teacher/*``).

Called by the learner role (:mod:`asyncopd.learner.worker`) on learner rank 0 after
each train step, with the scored rollouts it trained on. It reads the wire types
only; it trains nothing and writes nothing (the metrics writer logs what it returns).
"""

from __future__ import annotations

import numpy as np

from asyncopd.learner.batching import topk_overlap
from asyncopd.types import ScoredRollout

__all__ = ["batch_metrics"]


def batch_metrics(batch: list[ScoredRollout]) -> dict[str, float]:
    """Sample count, mean reward and response length, teacher time, and (when present)
    the behaviour policy's reverse KL to the teacher and the student/teacher top-k overlap."""
    if not batch:
        return {"batch/samples": 0}
    return {
        "batch/samples": len(batch),
        "batch/reward_mean": float(np.mean([s.rollout.reward for s in batch])),
        "batch/response_tokens_mean": float(np.mean([s.rollout.response_ids.shape[0] for s in batch])),
        "teacher/score_s": float(sum(s.score_s for s in batch)),
        **_rkl_behaviour(batch),
        **_topk_metrics(batch),
    }


def _rkl_behaviour(batch: list[ScoredRollout]) -> dict[str, float]:
    # NaN: a colocated teacher scores inside the train step (learner/rkl has it then).
    # Concatenated first, subtracted once: the same numbers as per sample, one numpy call.
    rkl = (np.concatenate([s.rollout.behaviour_logprobs for s in batch])
           - np.concatenate([s.teacher_logprobs for s in batch]))
    return {"teacher/rkl_behaviour": float(rkl.mean())} if rkl.size and np.isfinite(rkl).all() else {}


def _topk_metrics(batch: list[ScoredRollout]) -> dict[str, float]:
    with_topk = [s for s in batch if s.topk_ids is not None and s.rollout.student_topk_ids is not None]
    if not with_topk:
        return {}
    if len({s.rollout.student_topk_ids.shape[1] for s in with_topk}) == 1:  # one k (always, in a job): one call
        overlap = topk_overlap(np.concatenate([s.rollout.student_topk_ids for s in with_topk]),
                               np.concatenate([s.topk_ids for s in with_topk]))
    else:
        overlap = np.concatenate([topk_overlap(s.rollout.student_topk_ids, s.topk_ids) for s in with_topk])
    return {"learner/topk_overlap": float(overlap.mean())} if overlap.size else {}
