"""Sweep reports: t-intervals and Welch differences against known answers, a report
of a synthetic sweep (generic eval/* keys, baselines, failed runs), and plots that
are written and show something."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from asyncopd.report import ReportError, build_report, write_report
from asyncopd.report.__main__ import main as report_main
from asyncopd.report.stats import mean_ci, t_quantile, welch_difference


@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389),
                                               (30, 2.0422725), (math.inf, 1.9599640)])
def test_t_quantiles_match_the_tables(df, expected) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-6)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=2e-6)


def test_mean_ci_of_known_samples() -> None:
    ci = mean_ci([1.0, 2.0, 3.0])
    assert (ci.mean, ci.sd, ci.n) == (2.0, 1.0, 3)
    assert ci.half_width == pytest.approx(4.3026527 / math.sqrt(3), rel=1e-6)  # 2.4841
    assert math.isnan(mean_ci([5.0]).half_width) and mean_ci([5.0]).mean == 5.0
    assert mean_ci([1.0, float("nan"), 3.0]).n == 2


def test_welch_difference_of_known_samples() -> None:
    d = welch_difference([2.0, 4.0, 6.0, 8.0], [1.0, 2.0, 3.0])
    # var 20/3 over 4 and 1 over 3: se^2 = 2; df = 4 / ((5/3)^2/3 + (1/3)^2/2) = 4.0755
    assert d.diff == 3.0 and d.df == pytest.approx(4.0754717, rel=1e-6)
    assert d.half_width == pytest.approx(2.7562775 * math.sqrt(2), rel=1e-5)
    assert not d.outside_noise  # 3 < 3.898
    far = welch_difference([10.0, 11.0, 12.0], [1.0, 2.0, 3.0])
    assert far.outside_noise and far.diff == 9.0
    exact = welch_difference([1.0, 1.0], [2.0, 2.0])  # identical replicates: no noise
    assert exact.half_width == 0.0 and exact.outside_noise
    assert math.isnan(welch_difference([1.0], [2.0, 3.0]).half_width)


ACCURACY = {"eta=0": [0.80, 0.82, 0.84], "eta=2": [0.60, 0.62, 0.64], "eta=4": [0.80, 0.84, 0.88]}


def make_sweep(base: Path, values: dict[str, list[float]] = ACCURACY, *, failed: str | None = None) -> Path:
    jobs = []
    for name, accuracies in values.items():
        for seed, accuracy in enumerate(accuracies):
            run_dir = base / name / f"seed={seed}"
            run_dir.mkdir(parents=True)
            ok = not (name == failed and seed == 0)
            records = []
            for version in (0, 5, 10):
                frac = version / 10
                records.append({"step": version, "time": 1000.0 + 2.0 * version + seed,
                                "eval/policy_version": version, "eval/accuracy": 0.5 + (accuracy - 0.5) * frac,
                                "eval/rkl": 1.0 - 0.5 * frac, "eval/teacher_nll": 2.0 - frac * (1 + seed)})
                if version:
                    records.append({"step": version, "time": 1000.0 + 2.0 * version, "learner/loss": 0.1})
            (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
            if ok:
                summary = {"policy_version": 10, "start_policy_version": 0, "train_wall_s": 10.0 + seed,
                           "wall_s": 30.0, "samples_dropped_stale": seed, "samples_dropped_other": 1,
                           "eval/accuracy_after": accuracy}
                (run_dir / "summary.json").write_text(json.dumps(summary))
            jobs.append({"job": name, "seed": seed, "run_dir": str(run_dir), "returncode": 0 if ok else 1,
                         "summary": None})
    (base / "sweep.json").write_text(json.dumps(jobs))
    return base


def test_a_synthetic_sweep_report_has_known_means_intervals_and_differences(tmp_path) -> None:
    report = build_report(make_sweep(tmp_path))
    assert report.keys == ["eval/accuracy", "eval/rkl", "eval/teacher_nll", "s/step", "samples dropped", "wall s"]
    eta0, eta2, eta4 = report.combinations
    assert eta0.baseline is None and eta2.baseline == "eta=0" and eta4.baseline == "eta=0"
    acc = eta0.measures["eval/accuracy"]
    assert acc.mean == pytest.approx(0.82) and acc.half_width == pytest.approx(4.3026527 * 0.02 / math.sqrt(3))
    assert eta0.measures["s/step"].mean == pytest.approx(1.1)  # (10, 11, 12) s over 10 steps
    assert eta0.measures["samples dropped"].mean == pytest.approx(2.0)  # stale 0,1,2 + 1 other
    assert eta0.measures["eval/teacher_nll"].mean == pytest.approx(0.0)  # 2 - (1, 2, 3)
    assert eta2.differences["eval/accuracy"].diff == pytest.approx(-0.2)
    assert eta2.differences["eval/accuracy"].outside_noise
    assert not eta4.differences["eval/accuracy"].outside_noise  # +0.02 with a wide interval
    assert not eta2.differences["eval/rkl"].outside_noise and eta2.differences["eval/rkl"].half_width == 0.0
    lines = report.console_lines()
    assert any(line.startswith("eta=2") and "-0.2 ± 0.04534 *" in line for line in lines)
    assert any(line.startswith("eta=0") and "(baseline)" in line for line in lines)


def test_failed_runs_are_left_out_and_counted(tmp_path) -> None:
    report = build_report(make_sweep(tmp_path, failed="eta=2"))
    eta2 = report.combinations[1]
    assert len(eta2.runs) == 2 and eta2.failed == 1
    assert eta2.measures["eval/accuracy"].mean == pytest.approx(0.63)
    assert "1 failed runs (left out)" in report.markdown()


def test_a_partial_baseline_compares_within_the_other_keys(tmp_path) -> None:
    grid = {"eta=0,corr=tis": [0.8, 0.8], "eta=0,corr=none": [0.7, 0.7],
            "eta=4,corr=tis": [0.6, 0.6], "eta=4,corr=none": [0.5, 0.5]}
    report = build_report(make_sweep(tmp_path, grid), baseline="eta=0")
    assert {c.name: c.baseline for c in report.combinations} == {
        "eta=0,corr=tis": None, "eta=0,corr=none": None,
        "eta=4,corr=tis": "eta=0,corr=tis", "eta=4,corr=none": "eta=0,corr=none"}
    with pytest.raises(ReportError, match=r"--baseline 'eta=9' matches no combination.*Fix: use one of"):
        build_report(tmp_path, baseline="eta=9")


def test_report_files_and_plots_are_written_and_show_the_curves(tmp_path, capsys) -> None:
    make_sweep(tmp_path)
    assert report_main([str(tmp_path), "--baseline", "eta=2"]) == 0
    out = capsys.readouterr().out
    assert "report: " in out and "eta=0" in out
    markdown = (tmp_path / "report.md").read_text()
    assert "## Differences against the baseline" in markdown and "`eta=2`" in markdown
    assert "![eval/accuracy](plots/eval_accuracy.png)" in markdown
    data = json.loads((tmp_path / "report.json").read_text())
    assert [c["name"] for c in data["combinations"]] == ["eta=0", "eta=2", "eta=4"]
    assert data["combinations"][0]["values"]["eval/accuracy"] == [0.8, 0.82, 0.84]
    from matplotlib.image import imread

    for key in ("eval_accuracy", "eval_rkl", "eval_teacher_nll"):
        path = tmp_path / "plots" / f"{key}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        pixels = imread(path)
        assert pixels.shape[1] > 2 * pixels.shape[0] / 1.5  # two panels side by side
        assert np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0).shape[0] > 20  # lines and bands, not blank


def test_a_directory_without_runs_is_a_clear_error(tmp_path) -> None:
    assert report_main([str(tmp_path)]) == 2
