"""Student tokens to a target accuracy, per run and over replicate seeds.

Used by ``bench/opd_vs_grpo.py`` to compare objectives by the sampling they need:
from a run's ``metrics.jsonl`` it rebuilds the held-out accuracy curve against the
student tokens generated for training so far, finds the first evaluation at or
above a target, and summarises the seeds of each method with a Student-t interval
(a run that never reaches the target is *censored*: it counts with all its tokens,
and a summary that holds one is a lower bound, flagged). The ratio of two methods
is compared on log tokens (Welch's interval on the difference of mean log tokens,
exponentiated: a ratio of geometric means with its interval).

Pure functions on records and numbers: no plotting, no jobs, no files written.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from asyncopd.report.stats import MeanCI, mean_ci, welch_difference

__all__ = ["CurvePoint", "TokensSummary", "token_curve", "read_token_curve", "tokens_to_target",
           "summarize_tokens", "token_ratio"]


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """One evaluation of a run."""

    policy_version: int
    tokens: int
    """Student response tokens generated for the training batches of versions < policy_version."""
    accuracy: float
    rkl: float


def token_curve(records: Sequence[dict[str, Any]]) -> list[CurvePoint]:
    """The evaluations of a run (``metrics.jsonl`` records) against tokens generated for training.

    A training record with ``batch/samples`` and ``batch/response_tokens_mean`` at step ``s``
    adds their product to the count; an evaluation at policy version ``v`` sees the tokens
    of the batches of steps <= ``v`` (the batches that made version ``v``)."""
    tokens_at: dict[int, int] = {0: 0}
    total = 0
    for r in sorted((r for r in records if "batch/samples" in r), key=lambda r: r["step"]):
        total += round(r["batch/samples"] * r["batch/response_tokens_mean"])
        tokens_at[r["step"]] = total
    evals = sorted((r for r in records if "eval/accuracy" in r), key=lambda r: r["step"])
    missing = [r["step"] for r in evals if r["step"] not in tokens_at]
    if missing:
        raise ValueError(f"evaluations at steps {missing} have no training record with batch/samples: "
                         "the metrics are incomplete (was the run cut short?)")
    return [CurvePoint(int(r["step"]), tokens_at[r["step"]], float(r["eval/accuracy"]),
                       float(r.get("eval/rkl", math.nan))) for r in evals]


def read_token_curve(run_dir: Path) -> list[CurvePoint]:
    """:func:`token_curve` of ``run_dir/metrics.jsonl``."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return token_curve([json.loads(line) for line in lines if line.strip()])


def tokens_to_target(points: Sequence[CurvePoint], target: float) -> tuple[int, bool]:
    """(tokens at the first evaluation at or above ``target``, True); else (all the run's tokens, False)."""
    if not points:
        raise ValueError("no evaluations: cannot say when the target was reached")
    for p in points:
        if p.accuracy >= target:
            return p.tokens, True
    return points[-1].tokens, False


@dataclass(frozen=True, slots=True)
class TokensSummary:
    """Tokens to a target over the seeds of one method."""

    values: tuple[int, ...]
    """Per seed: tokens at the target, or the run's whole budget when not reached."""
    reached: tuple[bool, ...]
    ci: MeanCI

    @property
    def num_reached(self) -> int:
        return sum(self.reached)

    @property
    def censored(self) -> bool:
        """Some seed never reached the target: the mean is a lower bound."""
        return not all(self.reached)

    def text(self) -> str:
        """``"12,345 ± 678 (3/3 reached)"``; ``">= "`` before a censored mean; ``"> "`` and no
        interval (it would be the spread of run lengths) when no seed reached the target."""
        mean = f"{self.ci.mean:,.0f}"
        counts = f"({self.num_reached}/{len(self.values)} reached)"
        if self.num_reached == 0:
            return f"> {mean} {counts}"
        body = mean if math.isnan(self.ci.half_width) else f"{mean} ± {self.ci.half_width:,.0f}"
        return f"{'>= ' if self.censored else ''}{body} {counts}"


def summarize_tokens(curves: Sequence[Sequence[CurvePoint]], target: float, level: float = 0.95) -> TokensSummary:
    """Tokens to ``target`` of each run (one curve per seed) and their mean with its t-interval."""
    hits = [tokens_to_target(points, target) for points in curves]
    values = tuple(t for t, _ in hits)
    return TokensSummary(values=values, reached=tuple(ok for _, ok in hits),
                         ci=mean_ci([float(v) for v in values], level))


def token_ratio(numerator: TokensSummary, denominator: TokensSummary, level: float = 0.95
                ) -> tuple[float, float, float]:
    """(ratio of mean tokens, low, high): ``low``/``high`` bound the ratio of geometric means,
    exp of Welch's interval on mean log tokens (NaN with fewer than 2 seeds on a side)."""
    ratio = numerator.ci.mean / max(denominator.ci.mean, 1.0)
    d = welch_difference([math.log(max(v, 1)) for v in numerator.values],
                         [math.log(max(v, 1)) for v in denominator.values], level)
    if math.isnan(d.half_width):
        return ratio, math.nan, math.nan
    return ratio, math.exp(d.diff - d.half_width), math.exp(d.diff + d.half_width)
