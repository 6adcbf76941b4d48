"""Staleness ablations end to end with tiny random models: a replicated sweep
(2 combinations x 2 seeds) writes its report and plots, seeds move the run, and a
fixed-lag job repeated with the same seed reproduces it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from _jobs import run_tiny_job

pytestmark = pytest.mark.integration

# Short runs: 2 steps, evaluation every step on 4 prompts (2 samples each), one
# rollout per teacher forward and the actor's batch-independent GEMM (see
# test_a_fixed_lag_job_repeats_exactly_with_its_seed).
TINY = ["learner.num_steps=2", "task.num_eval_prompts=4", "eval.rkl_samples=2", "eval.every_steps=1",
        "async.schedule=fixed_lag", "teacher.max_batch_tokens=1", "actor.cpu_gemm=packed",
        "learner.export_hf=false"]


def launch(run_dir: Path, models: tuple[str, str], *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return run_tiny_job(run_dir, models, *TINY, *overrides, timeout=timeout)


# Metrics that depend on timing, not on the computation.
_TIMING = ("time", "timing/", "actor/", "teacher/score_s", "buffer/accepted")


def trajectory(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(_TIMING)} for r in records]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, models) -> tuple[Path, subprocess.CompletedProcess]:
    base = tmp_path_factory.mktemp("ablation") / "sweep"
    result = launch(base, models, "-m", "async.max_staleness=0,1", "run.seeds=2")
    assert result.returncode == 0
    return base, result


def test_a_replicated_sweep_writes_a_report_with_intervals_and_plots(sweep) -> None:
    base, result = sweep
    jobs = json.loads((base / "sweep.json").read_text())
    assert [(j["job"], j["seed"]) for j in jobs] == [("async.max_staleness=0", 0), ("async.max_staleness=0", 1),
                                                     ("async.max_staleness=1", 0), ("async.max_staleness=1", 1)]
    assert all(Path(j["run_dir"]) == base / j["job"] / f"seed={j['seed']}" for j in jobs)
    report = json.loads((base / "report.json").read_text())
    assert [(c["name"], c["n"]) for c in report["combinations"]] == [("async.max_staleness=0", 2),
                                                                     ("async.max_staleness=1", 2)]
    eta1 = report["combinations"][1]
    assert eta1["baseline"] == "async.max_staleness=0" and "eval/accuracy" in eta1["differences"]
    assert eta1["measures"]["s/step"]["half_width"] is not None  # two seeds: an interval
    markdown = (base / "report.md").read_text()
    assert "## Differences against the baseline" in markdown and "![eval/rkl](plots/eval_rkl.png)" in markdown
    for name in ("eval_accuracy.png", "eval_rkl.png"):
        assert (base / "plots" / name).stat().st_size > 10_000
    console = [line for line in result.stderr.splitlines() if "asyncopd.sweep" in line]
    assert any("Δ eval/accuracy" in line for line in console)
    assert any(line.split("asyncopd.sweep: ")[-1].startswith("async.max_staleness=1  2") for line in console)
    # Seeds move the run: the two replicates of one combination differ.
    assert trajectory(base / "async.max_staleness=1" / "seed=0") != trajectory(base / "async.max_staleness=1" / "seed=1")


def test_a_fixed_lag_job_repeats_exactly_with_its_seed(sweep, models, tmp_path) -> None:
    """Same seed, fixed_lag, one rollout per teacher forward: every non-timing metric of
    every step and evaluation is bit-identical to the sweep's run of that seed."""
    base, _ = sweep
    again = tmp_path / "again"
    assert launch(again, models, "async.max_staleness=1", "run.seed=1").returncode == 0
    assert trajectory(again) == trajectory(base / "async.max_staleness=1" / "seed=1")
