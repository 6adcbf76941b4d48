"""Held-out evaluation bookkeeping: completion count, accuracy, the RKL estimate, the NLL
of teacher samples, diversity of both sides and the examples kept for samples.jsonl."""

from __future__ import annotations

import numpy as np
import pytest

from asyncopd.learner.evaluation import EvalAccumulator
from asyncopd.types import Rollout, ScoredRollout


def _scored(rollout_id: str, kind: str, reward: float, behaviour: list[float], teacher: list[float],
            version: int = 3, group: int = 0, response: list[int] | None = None,
            finish_reason: str = "stop") -> ScoredRollout:
    n = len(behaviour)
    ids = np.arange(n, dtype=np.int32) if response is None else np.array(response, np.int32)
    rollout = Rollout(rollout_id=rollout_id, kind=kind, batch_index=version, group_id=group, actor_index=0,
                      prompt_ids=np.array([1, 2], np.int32), response_ids=ids,
                      behaviour_logprobs=np.array(behaviour, np.float32),
                      token_policy_versions=np.full(n, version, np.int32), policy_version=version,
                      reward=reward, finish_reason=finish_reason)
    return ScoredRollout(rollout=rollout, teacher_logprobs=np.array(teacher, np.float32), teacher_index=0,
                         score_s=0.0, policy_version=version)


def test_completes_after_one_greedy_and_rkl_samples_per_prompt() -> None:
    acc = EvalAccumulator(num_prompts=2, rkl_samples=2)
    items = [
        _scored("0-0", "eval_greedy", 1.0, [-0.1], [-0.1]),
        _scored("0-1", "eval_greedy", 0.0, [-0.1], [-0.1]),
        _scored("0-2", "eval_sample", 1.0, [-1.0, -2.0], [-2.0, -2.0]),
        _scored("0-3", "eval_sample", 0.0, [-1.0], [-3.0]),
        _scored("0-4", "eval_sample", 0.0, [-0.5], [-0.5]),
    ]
    for item in items:
        assert acc.add(item) is None
    assert acc.add(items[0]) is None  # a duplicate does not count
    metrics = acc.add(_scored("0-5", "eval_sample", 1.0, [-1.0], [-1.0]))
    assert metrics is not None and not acc.pending(3)
    assert metrics["eval/accuracy"] == 0.5
    assert metrics["eval/sample_accuracy"] == 0.5
    # Token mean of lp_student - lp_teacher over the 5 sampled tokens: (1 + 0 + 2 + 0 + 0) / 5.
    assert metrics["eval/rkl"] == pytest.approx(0.6)


EOS = 1


def test_teacher_samples_give_nll_forward_kl_and_diversity_of_both_sides() -> None:
    """2 prompts, 2 T=1 samples each, one teacher sample each. Student samples loop
    (token 7 then 8, again and again); the teacher's do not."""
    acc = EvalAccumulator(num_prompts=2, rkl_samples=2, num_references=2, num_examples=1)
    loop = [7, 8] * 4
    items = [
        _scored("0-0", "eval_greedy", 0.0, [0.0] * 8, [0.0] * 8, group=0, response=loop, finish_reason="length"),
        _scored("0-1", "eval_sample", 0.0, [-0.1] * 8, [-0.2] * 8, group=0, response=loop, finish_reason="length"),
        _scored("0-2", "eval_sample", 0.0, [-0.1] * 8, [-0.2] * 8, group=0, response=loop, finish_reason="length"),
        # The student's samples of prompt 1: the same loop, once ended by EOS.
        _scored("0-3", "eval_greedy", 0.0, [0.0] * 8, [0.0] * 8, group=1, response=loop, finish_reason="length"),
        _scored("0-4", "eval_sample", 0.0, [-0.1] * 9, [-0.2] * 9, group=1, response=loop + [EOS]),
        _scored("0-5", "eval_sample", 0.0, [-0.1] * 8, [-0.2] * 8, group=1, response=loop, finish_reason="length"),
        # Teacher samples, scored by the student (behaviour) and the teacher.
        _scored("0-6", "eval_reference", 1.0, [-3.0, -1.0, -2.0], [-1.0, -1.0, -1.0], group=0,
                response=[10, 11, EOS]),
        _scored("0-7", "eval_reference", 0.0, [-4.0, -2.0], [-0.5, -0.5], group=1, response=[12, 13],
                finish_reason="length"),
    ]
    for item in items[:-1]:
        assert acc.add(item) is None
    metrics = acc.add(items[-1])
    assert metrics is not None
    # Student NLL of teacher tokens: (3 + 1 + 2 + 4 + 2) / 5; the teacher's own: (1 + 1 + 1 + 0.5 + 0.5) / 5.
    assert metrics["eval/teacher_sample_nll"] == pytest.approx(12 / 5)
    assert metrics["eval/teacher_self_nll"] == pytest.approx(4 / 5)
    assert metrics["eval/forward_kl"] == pytest.approx(8 / 5)
    assert metrics["eval/teacher_accuracy"] == 0.5
    # Teacher: bigrams (10,11) and (12,13) (EOS stripped) are all distinct; the student
    # repeats (7,8) and (8,7): 2 distinct of 14 in each set of one sample per prompt.
    assert metrics["eval/teacher_distinct2"] == 1.0
    assert metrics["eval/distinct2"] == pytest.approx(2 / 14)
    # 4-grams of a sample of the loop: 5, of which 3 repeat; the teacher's have none.
    assert metrics["eval/repetition"] == pytest.approx(3 / 5)
    assert np.isnan(metrics["eval/teacher_repetition"])
    assert metrics["eval/eos_rate"] == 0.25 and metrics["eval/teacher_eos_rate"] == 0.5
    assert metrics["eval/response_tokens"] == pytest.approx(33 / 4)
    assert metrics["eval/teacher_response_tokens"] == 2.5
    (example,) = acc.examples[3]
    assert example.prompt_index == 0
    assert example.student_ids.tolist() == loop and example.teacher_ids.tolist() == [10, 11, EOS]
    assert example.teacher_finish == "stop" and example.student_finish == "length"


def test_without_teacher_samples_there_is_no_nll() -> None:
    acc = EvalAccumulator(num_prompts=1, rkl_samples=1)
    acc.add(_scored("0-0", "eval_greedy", 1.0, [-0.1], [-0.1]))
    metrics = acc.add(_scored("0-1", "eval_sample", 1.0, [-0.1, -0.1], [-0.2, -0.2], finish_reason="length"))
    assert metrics is not None and "eval/teacher_sample_nll" not in metrics
    assert metrics["eval/distinct2"] == 1.0


def test_the_console_summary_names_a_collapse(caplog, tmp_path) -> None:
    import logging

    from asyncopd.learner.summary import SUMMARY_EVAL_KEYS, print_summary

    summary = {f"{key}_{when}": 0.5 for key in SUMMARY_EVAL_KEYS for when in ("before", "after")}
    summary.update({"eval/teacher_self_nll": 0.2, "eval/teacher_distinct2": 0.9, "eval/teacher_repetition": None,
                    "buffer/staleness_max": 1, "async/max_staleness": 1, "samples_trained": 8,
                    "samples_dropped_stale": 0, "wall_s": 1.0, "eval/verdict": "collapse",
                    "objective": "1 x exact reverse KL over the full vocabulary (loss.kl_loss=full ...)",
                    "eval/verdict_reasons": ["student distinct-2 0.003 fell below 0.5 x the teacher's 0.900"]})
    with caplog.at_level(logging.INFO):
        print_summary(summary, tmp_path)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "verdict: COLLAPSE: student distinct-2 0.003" in warning.getMessage()
    assert any("repetition rate" in r.getMessage() and "(teacher n/a)" in r.getMessage() for r in caplog.records)
    assert any(r.getMessage() == "   objective: 1 x exact reverse KL over the full vocabulary (loss.kl_loss=full ...)"
               for r in caplog.records)


def test_a_completed_version_forgets_its_ids_and_refuses_late_copies() -> None:
    # A long job evaluates again and again; the ids of finished evaluations must not pile up.
    acc = EvalAccumulator(num_prompts=1, rkl_samples=1)
    for version in range(50):
        assert acc.add(_scored(f"g{version}", "eval_greedy", 1.0, [-0.1], [-0.1], version=version)) is None
        assert acc.add(_scored(f"e{version}", "eval_sample", 1.0, [-0.1], [-0.2], version=version)) is not None
    assert not acc._seen and not acc._results and len(acc.completed) == 50
    assert acc.add(_scored("g3", "eval_greedy", 0.0, [-0.1], [-0.1], version=3)) is None  # late copy
    assert not acc._seen and not acc._results and acc.completed[3]["eval/accuracy"] == 1.0
