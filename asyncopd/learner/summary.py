"""What the learner says about a run: summary.json, the eval line and the console summary.

The learner role (:mod:`asyncopd.learner.worker`) writes ``summary.json`` from
:func:`run_summary` (the keys of :data:`SUMMARY_EVAL_KEYS` before and after, the
verdict, staleness and sample counters) and calls :func:`print_summary` when training
ends; :func:`eval_line` is the one-line form of an evaluation in metrics.log.
This module computes nothing; it only gathers and formats what it is given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from asyncopd.config import JobConfig
from asyncopd.quality import Verdict

__all__ = ["SUMMARY_EVAL_KEYS", "eval_line", "print_summary", "run_summary"]

logger = logging.getLogger(__name__)

SUMMARY_EVAL_KEYS = ("eval/accuracy", "eval/rkl", "eval/teacher_sample_nll", "eval/forward_kl", "eval/distinct2",
                      "eval/repetition", "eval/response_tokens", "eval/eos_rate")
"""Eval metrics that summary.json reports before and after training (``<key>_before``, ``<key>_after``)."""


def run_summary(cfg: JobConfig, *, before: dict[str, float], after: dict[str, float], verdict: Verdict,
                actor_metrics: dict[str, Any], counters: dict[str, Any]) -> dict[str, Any]:
    """summary.json's content: the evaluations ``before`` (the run's start) and ``after``
    (its last policy version), the collapse ``verdict``, the actors' cumulative metrics
    and the learner's ``counters`` (samples, drops, staleness, versions, resumes, wall
    times). Non-finite floats become None (strict JSON)."""
    summary = {
        "objective": cfg.objective,
        "eval/verdict": verdict.status,
        "eval/verdict_reasons": list(verdict.reasons),
        **{f"{key}_{when}": evaluation.get(key) for key in SUMMARY_EVAL_KEYS
           for when, evaluation in (("before", before), ("after", after))},
        "eval/teacher_distinct2": after.get("eval/teacher_distinct2"),
        "eval/teacher_repetition": after.get("eval/teacher_repetition"),
        "eval/teacher_self_nll": after.get("eval/teacher_self_nll"),
        "async/max_staleness": cfg.async_.max_staleness,
        "async/schedule": cfg.async_.schedule,
        **counters,
        **{k: v for k, v in actor_metrics.items() if k != "actor/tokens_per_s"},
    }
    return {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in summary.items()}


def eval_line(m: dict[str, Any]) -> str:
    """One evaluation's metrics as the line metrics.log shows."""
    line = f"accuracy {m['eval/accuracy']:.3f}, reverse KL {m['eval/rkl']:.4f}, distinct-2 {m['eval/distinct2']:.3f}"
    if "eval/teacher_sample_nll" in m:
        line += (f" (teacher {m['eval/teacher_distinct2']:.3f}), NLL of teacher samples "
                 f"{m['eval/teacher_sample_nll']:.4f} (teacher's own {m['eval/teacher_self_nll']:.4f})")
    return line


def print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    """Log the finished run's summary (before -> after, staleness, verdict) on the console."""
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)

    def row(label: str, key: str) -> str:
        return f"   {label:<24}{fmt(summary[key + '_before'])} -> {fmt(summary[key + '_after'])}"

    lines = [
        f"== asyncopd run finished: {run_dir}",
        f"   objective: {summary['objective']}",
        row("held-out accuracy", "eval/accuracy"),
        row("reverse KL / token", "eval/rkl"),
        row("NLL of teacher samples", "eval/teacher_sample_nll")
        + f" (teacher's own {fmt(summary['eval/teacher_self_nll'])})",
        row("distinct-2", "eval/distinct2") + f" (teacher {fmt(summary['eval/teacher_distinct2'])})",
        row("repetition rate", "eval/repetition") + f" (teacher {fmt(summary['eval/teacher_repetition'])})",
        f"   staleness max {summary['buffer/staleness_max']} (bound {summary['async/max_staleness']}), "
        f"samples trained {summary['samples_trained']}, dropped stale {summary['samples_dropped_stale']}, "
        f"wall {summary['wall_s']:.1f}s",
    ]
    for line in lines:
        logger.info("%s", line)
    verdict = Verdict(summary["eval/verdict"], tuple(summary["eval/verdict_reasons"]))
    if verdict.status == "collapse":
        logger.warning("   verdict: %s. Lower eval/rkl does not mean a better student here; see samples.jsonl.",
                       verdict.describe())
    elif verdict.status == "worse":
        logger.warning("   verdict: %s. The student moved away from the teacher; see samples.jsonl.",
                       verdict.describe())
    else:
        logger.info("   verdict: %s", verdict.describe())
