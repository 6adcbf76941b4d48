"""Tokens to a target accuracy (asyncopd/report/tokens.py): curve rebuilding, censoring, ratios."""

from __future__ import annotations

import math

import pytest

from asyncopd.report.stats import t_quantile
from asyncopd.report.tokens import (
    CurvePoint,
    summarize_tokens,
    token_curve,
    token_ratio,
    tokens_to_target,
)


def _records(tokens_per_step: list[tuple[int, float]], evals: dict[int, float]) -> list[dict]:
    """metrics.jsonl-like records: a training record per step (samples, mean response length)
    and evaluation records at the given policy versions."""
    out: list[dict] = [{"step": step, "eval/accuracy": acc, "eval/rkl": 1.0 - acc} for step, acc in evals.items()]
    out += [{"step": i + 1, "batch/samples": n, "batch/response_tokens_mean": mean}
            for i, (n, mean) in enumerate(tokens_per_step)]
    return out


def test_curve_counts_tokens_of_the_batches_before_each_evaluation() -> None:
    records = _records([(4, 2.5), (4, 3.0), (8, 1.0)], {0: 0.1, 2: 0.4, 3: 0.6})
    curve = token_curve(records)
    assert [(p.policy_version, p.tokens, p.accuracy) for p in curve] == [(0, 0, 0.1), (2, 22, 0.4), (3, 30, 0.6)]
    assert curve[1].rkl == pytest.approx(0.6)


def test_curve_refuses_an_evaluation_without_its_training_records() -> None:
    with pytest.raises(ValueError, match=r"steps \[5\]"):
        token_curve(_records([(4, 1.0)], {0: 0.0, 5: 0.5}))


def _curve(points: list[tuple[int, float]]) -> list[CurvePoint]:
    return [CurvePoint(i, tokens, acc, 0.0) for i, (tokens, acc) in enumerate(points)]


def test_tokens_to_target_is_the_first_evaluation_at_or_above_it() -> None:
    curve = _curve([(0, 0.05), (100, 0.3), (200, 0.5), (300, 0.45), (400, 0.7)])
    assert tokens_to_target(curve, 0.5) == (200, True)  # "at or above": 0.5 counts
    assert tokens_to_target(curve, 0.6) == (400, True)  # the dip at 300 does not matter
    assert tokens_to_target(curve, 0.05) == (0, True)
    assert tokens_to_target(curve, 0.8) == (400, False)  # never: the whole run, flagged
    with pytest.raises(ValueError):
        tokens_to_target([], 0.5)


def test_summary_over_seeds_has_the_t_interval_and_flags_censoring() -> None:
    curves = [_curve([(0, 0.0), (100, 0.6)]), _curve([(0, 0.0), (100, 0.2), (200, 0.6)]),
              _curve([(0, 0.0), (150, 0.6)])]
    s = summarize_tokens(curves, 0.5)
    assert s.values == (100, 200, 150) and s.reached == (True, True, True) and not s.censored
    assert s.ci.mean == pytest.approx(150.0)
    assert s.ci.half_width == pytest.approx(t_quantile(0.975, 2) * 50.0 / math.sqrt(3))  # sd 50
    assert s.text() == "150 ± 124 (3/3 reached)"

    partly = summarize_tokens(curves, 0.55 + 0.1)  # nobody reaches 0.65
    assert partly.values == (100, 200, 150) and partly.num_reached == 0
    assert partly.text() == "> 150 (0/3 reached)"  # no interval: it would be the spread of run lengths
    some = summarize_tokens([_curve([(0, 0.0), (100, 0.6)]), _curve([(0, 0.0), (300, 0.1)])], 0.5)
    assert some.censored and some.text().startswith(">= 200 ± ") and "(1/2 reached)" in some.text()


def test_ratio_of_means_and_the_interval_of_the_geometric_mean_ratio() -> None:
    grpo = summarize_tokens([_curve([(0, 0.0), (t, 1.0)]) for t in (400, 800, 1600)], 0.5)
    opd = summarize_tokens([_curve([(0, 0.0), (t, 1.0)]) for t in (100, 200, 400)], 0.5)
    ratio, low, high = token_ratio(grpo, opd)
    assert ratio == pytest.approx((2800 / 3) / (700 / 3))
    # On log tokens: difference log 4, each side's sd ln 2 over 3 seeds, so Welch has df = 4.
    half = t_quantile(0.975, 4) * math.sqrt(2 * math.log(2) ** 2 / 3)
    assert math.sqrt(low * high) == pytest.approx(4.0)
    assert low == pytest.approx(4.0 * math.exp(-half)) and high == pytest.approx(4.0 * math.exp(half))
    single = summarize_tokens([_curve([(0, 0.0), (100, 1.0)])], 0.5)
    assert math.isnan(token_ratio(single, opd)[1])
