"""Sample-quality measures and the collapse verdict: pure functions, no I/O, no torch.

Per-token reverse KL on the student's own samples is the training signal, not the
verdict: a student can lower it by collapsing into text that the teacher, given
that text, finds likely (``shared/notes/real-models.md``: eval/rkl fell 91% while
every answer became ``'-\\n\\n-\\n\\n...'``). Each evaluation therefore also
measures what the student cannot game, and this module holds those measures and
the one rule that names a collapse:

- :func:`distinct_n`: unique n-grams / all n-grams over a set of samples
  (corpus-level distinct-n, Li et al. 2016). Compare sets of equal size (one
  sample per prompt): the value falls as a set grows.
- :func:`repetition_rate`: the fraction of each sample's n-grams that already
  occurred earlier in the same sample (seq-rep-n, Welleck et al. 2019); near 1 for
  a loop, near 0 for fluent text.
- :func:`response_stats`: mean length and end-of-sequence rate.
- :func:`collapse_verdict`: :class:`CollapseRule`, applied to the first and the
  latest evaluation of a run.

Samples are sequences of any hashable tokens (token ids in the job; characters in
tests). Who calls it: the learner's eval bookkeeping and its summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Hashable, Literal

__all__ = ["distinct_n", "repetition_rate", "response_stats", "CollapseRule", "Verdict", "collapse_verdict"]

Sample = Sequence[Hashable]


def _ngrams(sample: Sample, n: int) -> list[tuple]:
    return [tuple(sample[i : i + n]) for i in range(len(sample) - n + 1)]


def distinct_n(samples: Sequence[Sample], n: int = 2) -> float:
    """Unique n-grams over all n-grams of ``samples`` (pooled); NaN when none has n tokens."""
    grams = [g for sample in samples for g in _ngrams(sample, n)]
    return len(set(grams)) / len(grams) if grams else math.nan


def repetition_rate(samples: Sequence[Sample], n: int = 4) -> float:
    """Fraction of n-grams that repeat an earlier n-gram of the same sample, pooled over
    ``samples``; NaN when none has n tokens."""
    total = repeated = 0
    for sample in samples:
        seen: set[tuple] = set()
        for gram in _ngrams(sample, n):
            repeated += gram in seen
            seen.add(gram)
            total += 1
    return repeated / total if total else math.nan


def response_stats(lengths: Sequence[int], finish_reasons: Sequence[str]) -> tuple[float, float]:
    """(mean length in tokens, fraction that ended by end-of-sequence ("stop")); NaN when empty."""
    if not lengths:
        return math.nan, math.nan
    return sum(lengths) / len(lengths), sum(r == "stop" for r in finish_reasons) / len(finish_reasons)


@dataclass(frozen=True, slots=True)
class CollapseRule:
    """When a run is called a collapse. ``start`` is the run's first evaluation, ``end``
    its latest; keys are the eval/* metrics. Any one condition makes a collapse:

    1. **diversity**: the student's distinct-2 at ``end`` is below ``distinct_ratio`` x
       the teacher's (its own at ``start`` when the teacher's is unknown: no teacher
       samples, or none long enough), and
       below its own at ``start`` (it fell during the run; a student that starts
       degenerate and improves is not collapsing);
    2. **repetition**: the student's repetition rate at ``end`` exceeds the teacher's
       (its own at ``start`` when the teacher's is unknown) by more than
       ``repetition_margin``, and its own at ``start``;
    3. **divergence**: the student's NLL of the teacher's samples rose by more than
       ``nll_rise`` (relative) from ``start`` while eval/rkl fell: the training signal
       improved while the student moved away from the teacher's own text.

    Rules 1-2 compare one T=1 sample per prompt for student and teacher (equal sets).
    Without a collapse, a run is **worse** when the NLL of teacher samples rose by more
    than ``nll_rise`` while eval/rkl did not fall (or, without teacher samples, eval/rkl
    rose by more than ``nll_rise``): a plain failure to learn, e.g. a too-high lr.
    """

    distinct_ratio: float = 0.5
    """Student distinct-2 below this fraction of the baseline's counts as lost diversity."""
    repetition_margin: float = 0.25
    """Student repetition rate above the baseline's by more than this counts as looping."""
    nll_rise: float = 0.05
    """Relative rise of the NLL of teacher samples (0.05 = 5%) that counts as divergence."""


@dataclass(frozen=True, slots=True)
class Verdict:
    status: Literal["ok", "collapse", "worse", "unknown"]
    """"collapse": a condition of the rule held; "worse": none did, but the student moved away
    from the teacher by every measure available; "ok": neither; "unknown": no evaluation to judge."""
    reasons: tuple[str, ...] = ()
    """One plain sentence per condition that held."""

    def describe(self) -> str:
        if self.status in ("collapse", "worse"):
            return f"{self.status.upper()}: " + "; ".join(self.reasons)
        return "ok (no collapse by the rule in asyncopd/quality.py)" if self.status == "ok" else "unknown (no evaluation)"


def _finite(metrics: Mapping[str, float | None], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def collapse_verdict(start: Mapping[str, float | None], end: Mapping[str, float | None],
                     rule: CollapseRule = CollapseRule()) -> Verdict:
    """Apply ``rule`` to the eval metrics of a run's first (``start``) and latest (``end``) evaluation."""
    if not end:
        return Verdict("unknown")
    reasons: list[str] = []
    d2_end, d2_start = _finite(end, "eval/distinct2"), _finite(start, "eval/distinct2")
    d2_teacher = _finite(end, "eval/teacher_distinct2")
    d2_base, d2_name = (d2_teacher, "the teacher's") if d2_teacher is not None else (d2_start, "its start")
    if d2_end is not None and d2_base is not None and d2_start is not None:
        if d2_end < rule.distinct_ratio * d2_base and d2_end < d2_start:
            reasons.append(f"student distinct-2 {d2_end:.3f} fell below {rule.distinct_ratio:g} x {d2_name} "
                           f"{d2_base:.3f} (start {d2_start:.3f})")
    rep_end, rep_start = _finite(end, "eval/repetition"), _finite(start, "eval/repetition")
    rep_teacher = _finite(end, "eval/teacher_repetition")
    rep_base, rep_name = (rep_teacher, "the teacher's") if rep_teacher is not None else (rep_start, "its start")
    if rep_end is not None and rep_base is not None and rep_start is not None:
        if rep_end > rep_base + rule.repetition_margin and rep_end > rep_start:
            reasons.append(f"student repetition rate {rep_end:.3f} exceeds {rep_name} {rep_base:.3f} by more "
                           f"than {rule.repetition_margin:g} (start {rep_start:.3f})")
    nll_end, nll_start = _finite(end, "eval/teacher_sample_nll"), _finite(start, "eval/teacher_sample_nll")
    rkl_end, rkl_start = _finite(end, "eval/rkl"), _finite(start, "eval/rkl")
    nll_rose = None not in (nll_end, nll_start) and nll_end > nll_start + rule.nll_rise * abs(nll_start)
    if nll_rose and None not in (rkl_end, rkl_start) and rkl_end < rkl_start:
        reasons.append(f"NLL of teacher samples rose {nll_start:.3f} -> {nll_end:.3f} while eval/rkl fell "
                       f"{rkl_start:.3f} -> {rkl_end:.3f}")
    if reasons:
        return Verdict("collapse", tuple(reasons))
    rkl_rose = None not in (rkl_end, rkl_start) and rkl_end > rkl_start + rule.nll_rise * abs(rkl_start)
    if nll_rose:
        rkl = "unknown" if None in (rkl_start, rkl_end) else f"{rkl_start:.3f} -> {rkl_end:.3f}"
        return Verdict("worse", (f"NLL of teacher samples rose {nll_start:.3f} -> {nll_end:.3f} and eval/rkl did "
                                 f"not fall ({rkl})",))
    if nll_start is None and rkl_rose:
        return Verdict("worse", (f"eval/rkl rose {rkl_start:.3f} -> {rkl_end:.3f}",))
    return Verdict("ok")
