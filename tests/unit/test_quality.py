"""Sample-quality measures and the collapse verdict on hand-made degenerate and healthy samples."""

from __future__ import annotations

import math

import pytest

from asyncopd.quality import CollapseRule, collapse_verdict, distinct_n, repetition_rate, response_stats

LOOP = "-\n\n" * 16  # the collapsed SmolLM2 student's answer to every prompt (notes/real-models.md)
HEALTHY = [
    "The capital of France is Paris, a city on the Seine.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "A haiku has three lines of five, seven and five syllables.",
]


def words(text: str) -> list[str]:
    return text.split()


def test_distinct_n_counts_unique_ngrams_over_all_samples() -> None:
    assert distinct_n([[1, 2, 3], [1, 2, 4]], n=2) == pytest.approx(3 / 4)  # (1,2) twice
    assert distinct_n([[1, 2, 3]], n=1) == 1.0
    assert math.isnan(distinct_n([[1], []], n=2))  # no bigram at all


def test_repetition_rate_counts_ngrams_seen_earlier_in_the_same_sample() -> None:
    # 1 2 1 2 1: bigrams (1,2) (2,1) (1,2) (2,1): the last two repeat.
    assert repetition_rate([[1, 2, 1, 2, 1]], n=2) == pytest.approx(2 / 4)
    # Repeats across samples do not count: each sample is judged on its own.
    assert repetition_rate([[1, 2, 3], [1, 2, 3]], n=2) == 0.0
    assert math.isnan(repetition_rate([[1, 2]], n=4))


def test_a_loop_is_degenerate_by_both_measures_and_fluent_text_is_not() -> None:
    loops = [list(LOOP)] * len(HEALTHY)  # every prompt answered with the same loop
    fluent = [list(t) for t in HEALTHY]
    assert distinct_n(loops, n=2) == pytest.approx(3 / 188)  # "-\n", "\n\n", "\n-" among 4 x 47
    assert distinct_n(fluent, n=2) > 0.5
    assert repetition_rate(loops, n=4) > 0.9
    assert repetition_rate(fluent, n=4) < 0.1
    # Word level, as a BPE tokenizer would see it: the same contrast.
    assert repetition_rate([words(t) for t in HEALTHY], n=4) == 0.0
    assert distinct_n([words(t) for t in HEALTHY], n=2) == 1.0


def test_response_stats_are_mean_length_and_eos_rate() -> None:
    assert response_stats([4, 8, 12], ["stop", "length", "stop"]) == (8.0, pytest.approx(2 / 3))
    assert all(math.isnan(x) for x in response_stats([], []))


def _eval(d2: float, rep: float, nll: float | None, rkl: float, teacher_d2: float | None = 0.9,
          teacher_rep: float | None = 0.02) -> dict[str, float | None]:
    return {"eval/distinct2": d2, "eval/repetition": rep, "eval/teacher_sample_nll": nll, "eval/rkl": rkl,
            "eval/teacher_distinct2": teacher_d2, "eval/teacher_repetition": teacher_rep}


def test_the_collapse_of_the_notes_is_named_although_rkl_fell_91_percent() -> None:
    # Measured in notes/real-models.md: distinct-2 0.25 -> 0.003 (teacher 0.90),
    # NLL of teacher samples 12.99 -> 17.45, eval/rkl 4.99 -> 0.47.
    verdict = collapse_verdict(_eval(0.25, 0.30, 12.99, 4.99), _eval(0.003, 0.98, 17.45, 0.47))
    assert verdict.status == "collapse"
    assert len(verdict.reasons) == 3
    assert "distinct-2 0.003" in verdict.reasons[0] and "0.900" in verdict.reasons[0]
    assert "12.990 -> 17.450" in verdict.reasons[2]
    assert verdict.describe().startswith("COLLAPSE: ")


def test_a_healthy_run_is_ok() -> None:
    verdict = collapse_verdict(_eval(0.80, 0.03, 4.14, 1.8), _eval(0.85, 0.02, 3.93, 0.9))
    assert verdict.status == "ok" and verdict.reasons == ()


def test_a_student_that_starts_degenerate_and_improves_is_not_a_collapse() -> None:
    verdict = collapse_verdict(_eval(0.10, 0.6, 13.0, 5.0), _eval(0.30, 0.4, 9.0, 3.0))
    assert verdict.status == "ok"


def test_each_condition_alone_names_a_collapse() -> None:
    start = _eval(0.80, 0.03, 4.0, 2.0)
    assert collapse_verdict(start, _eval(0.40, 0.03, 4.0, 1.0)).reasons[0].startswith("student distinct-2")
    assert collapse_verdict(start, _eval(0.80, 0.40, 4.0, 1.0)).reasons[0].startswith("student repetition")
    assert collapse_verdict(start, _eval(0.80, 0.03, 4.3, 1.0)).reasons[0].startswith("NLL of teacher samples")
    # The NLL rising while eval/rkl rises too is a failed run, not a collapse: named "worse".
    worse = collapse_verdict(start, _eval(0.80, 0.03, 4.3, 2.5))
    assert worse.status == "worse" and worse.describe().startswith("WORSE: NLL of teacher samples rose 4.000")
    # Within the rule's tolerance.
    assert collapse_verdict(start, _eval(0.80, 0.03, 4.1, 1.0)).status == "ok"
    strict = CollapseRule(nll_rise=0.01)
    assert collapse_verdict(start, _eval(0.80, 0.03, 4.1, 1.0), strict).status == "collapse"


def test_without_teacher_samples_the_student_is_compared_with_its_start() -> None:
    start = _eval(0.80, 0.03, None, 2.0, teacher_d2=None, teacher_rep=None)
    collapsed = collapse_verdict(start, _eval(0.30, 0.03, None, 1.0, teacher_d2=None, teacher_rep=None))
    assert collapsed.status == "collapse" and "its start 0.800" in collapsed.reasons[0]
    fine = collapse_verdict(start, _eval(0.70, 0.05, None, 1.0, teacher_d2=None, teacher_rep=None))
    assert fine.status == "ok"
    diverged = collapse_verdict(start, _eval(0.70, 0.05, None, 12.0, teacher_d2=None, teacher_rep=None))
    assert diverged.status == "worse" and "eval/rkl rose 2.000 -> 12.000" in diverged.reasons[0]
    assert collapse_verdict(start, {}).status == "unknown"
