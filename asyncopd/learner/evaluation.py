"""Held-out evaluation results, gathered on learner rank 0.

At an eval version, actors run every held-out prompt greedily once (accuracy =
mean verifier reward), sample it ``eval.rkl_samples`` times at temperature 1
(reverse KL = mean over sampled tokens of ``lp_student - lp_teacher``, the
Monte-Carlo estimate of the per-token reverse KL to the teacher), and score the
teacher's own sample of it teacher-forced (``eval_reference``; the rollout's
``behaviour_logprobs`` are the student's log-probs of the teacher's tokens and its
``teacher_logprobs`` the teacher's). The metrics of one version, all ``eval/*``:

- ``accuracy``, ``sample_accuracy``, ``rkl``, ``response_tokens``, ``eos_rate``:
  the student (greedy accuracy; the rest on its T=1 samples);
- ``distinct2``, ``repetition``: the student's diversity (:mod:`asyncopd.quality`);
  distinct-2 is the mean over sets of one T=1 sample per prompt, the size of the
  teacher's set, so the two compare;
- ``teacher_sample_nll``: the student's per-token NLL of the teacher's samples (the
  measure a collapsing student cannot lower); ``teacher_self_nll``: the teacher's own;
  ``forward_kl``: their difference, the per-token forward KL(teacher || student)
  estimated on the teacher's samples;
- ``teacher_distinct2``, ``teacher_repetition``, ``teacher_response_tokens``,
  ``teacher_eos_rate``, ``teacher_accuracy``: the same measures of the teacher's samples.

Pure bookkeeping: no I/O. The few prompt/completion pairs a person reads are kept
as token ids in :attr:`EvalAccumulator.examples` (the learner decodes and writes them).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from asyncopd.quality import distinct_n, repetition_rate, response_stats
from asyncopd.types import ScoredRollout

__all__ = ["EvalAccumulator", "EvalExample"]


@dataclass(frozen=True, slots=True)
class EvalExample:
    """One held-out prompt at one eval version, as token ids (None where absent)."""

    prompt_index: int
    prompt_ids: np.ndarray
    student_ids: np.ndarray | None
    """The student's first T=1 sample."""
    student_finish: str | None
    greedy_ids: np.ndarray | None
    teacher_ids: np.ndarray | None
    """The teacher's reference sample."""
    teacher_finish: str | None


def _sequence(s: ScoredRollout) -> list[int]:
    """Response tokens without the final EOS (it is not part of the text)."""
    ids = s.rollout.response_ids.tolist()
    return ids[:-1] if s.rollout.finish_reason == "stop" and ids else ids


def _order(s: ScoredRollout) -> tuple[int, str]:
    """A deterministic order of eval samples (by actor, then request id: the ids name
    version, prompt and sample, see the actor's ``_slot_id_and_seed``)."""
    return s.rollout.actor_index, s.rollout.rollout_id


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _side_metrics(prefix: str, rollouts: list[ScoredRollout], matched: list[list[ScoredRollout]]) -> dict[str, float]:
    """Diversity, length and EOS rate of one side; ``matched``: sets of one sample per prompt."""
    length, eos_rate = response_stats([s.rollout.response_ids.shape[0] for s in rollouts],
                                      [s.rollout.finish_reason for s in rollouts])
    distinct = [d for group in matched if np.isfinite(d := distinct_n([_sequence(s) for s in group], 2))]
    return {
        f"eval/{prefix}distinct2": _mean(distinct),
        f"eval/{prefix}repetition": repetition_rate([_sequence(s) for s in rollouts], 4),
        f"eval/{prefix}response_tokens": length,
        f"eval/{prefix}eos_rate": eos_rate,
    }


class EvalAccumulator:
    def __init__(self, num_prompts: int, rkl_samples: int = 1, num_references: int = 0,
                 num_examples: int = 0) -> None:
        """``num_references``: teacher samples scored per version (one per prompt that has
        one); ``num_examples``: prompts kept in :attr:`examples` per version."""
        self.num_prompts = num_prompts
        self.rkl_samples = rkl_samples
        self.num_references = num_references
        self.num_examples = num_examples
        self._results: dict[int, list[ScoredRollout]] = defaultdict(list)
        self._seen: dict[int, set[str]] = defaultdict(set)
        """Rollout ids received, by version under evaluation; dropped once it completes."""
        self.completed: dict[int, dict[str, float]] = {}
        self.examples: dict[int, list[EvalExample]] = {}
        """Per completed version, the first ``num_examples`` held-out prompts; the reader pops them."""

    @property
    def expected(self) -> int:
        return self.num_prompts * (1 + self.rkl_samples) + self.num_references

    def add(self, scored: ScoredRollout) -> dict[str, float] | None:
        """Record one eval sample; returns the version's metrics once it is complete."""
        rollout = scored.rollout
        version = rollout.batch_index
        if version in self.completed or rollout.rollout_id in self._seen[version]:
            return None  # a copy (a retried scoring that two teachers finished)
        self._seen[version].add(rollout.rollout_id)
        results = self._results[version]
        results.append(scored)
        if len(results) < self.expected:
            return None
        results.sort(key=lambda s: s.rollout.rollout_id)  # arrival order is timing; sums must not be
        metrics = self._metrics(version, results)
        self.examples[version] = self._examples(results)
        self.completed[version] = metrics
        del self._results[version]
        del self._seen[version]  # later copies are refused as completed: a long job keeps no ids
        return metrics

    def pending(self, version: int) -> bool:
        return version not in self.completed

    def _metrics(self, version: int, results: list[ScoredRollout]) -> dict[str, float]:
        greedy = [s.rollout.reward for s in results if s.rollout.kind == "eval_greedy"]
        sampled = sorted((s for s in results if s.rollout.kind == "eval_sample"),
                         key=_order)
        references = [s for s in results if s.rollout.kind == "eval_reference"]
        rkl_tokens = np.concatenate(
            [s.rollout.behaviour_logprobs - s.teacher_logprobs for s in sampled]
        ) if sampled else np.zeros(0)
        by_prompt: dict[int, list[ScoredRollout]] = defaultdict(list)
        for s in sampled:
            by_prompt[s.rollout.group_id].append(s)
        # Set j holds the j-th sample of every prompt: the size of the teacher's set.
        slices = [[group[j] for group in by_prompt.values() if len(group) > j]
                  for j in range(max((len(g) for g in by_prompt.values()), default=0))]
        metrics = {
            "eval/policy_version": version,
            "eval/accuracy": _mean(greedy),
            "eval/sample_accuracy": _mean([s.rollout.reward for s in sampled]),
            "eval/rkl": float(rkl_tokens.mean()) if rkl_tokens.size else float("nan"),
            **_side_metrics("", sampled, slices),
        }
        if references:
            student = -np.concatenate([s.rollout.behaviour_logprobs for s in references])
            teacher = -np.concatenate([s.teacher_logprobs for s in references])
            metrics.update({
                "eval/teacher_sample_nll": float(student.mean()),
                "eval/teacher_self_nll": float(teacher.mean()),
                "eval/forward_kl": float((student - teacher).mean()),
                "eval/teacher_accuracy": _mean([s.rollout.reward for s in references]),
                **_side_metrics("teacher_", references, [references]),
            })
        return metrics

    def _examples(self, results: list[ScoredRollout]) -> list[EvalExample]:
        first: dict[tuple[str, int], ScoredRollout] = {}
        for s in sorted(results, key=_order):
            first.setdefault((s.rollout.kind, s.rollout.group_id), s)
        indices = sorted({group for _, group in first})[: self.num_examples]
        examples = []
        for index in indices:
            sample, greedy = first.get(("eval_sample", index)), first.get(("eval_greedy", index))
            reference = first.get(("eval_reference", index))
            any_one = sample or greedy or reference
            assert any_one is not None
            examples.append(EvalExample(
                prompt_index=index, prompt_ids=any_one.rollout.prompt_ids,
                student_ids=None if sample is None else sample.rollout.response_ids,
                student_finish=None if sample is None else sample.rollout.finish_reason,
                greedy_ids=None if greedy is None else greedy.rollout.response_ids,
                teacher_ids=None if reference is None else reference.rollout.response_ids,
                teacher_finish=None if reference is None else reference.rollout.finish_reason))
        return examples
