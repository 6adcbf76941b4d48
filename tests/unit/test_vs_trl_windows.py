"""bench/vs_trl.py's --repeat bookkeeping: the median over windows and the score cache key."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bench.vs_trl import TaskSpec, median_over_windows, snapshot_digest, time_to

SPEC = TaskSpec(name="demo", config_name="default", steps=10, batch=4, lr=1e-4, snapshot_every=5, eval_samples=1)


def _result(topk: float, colocated: float | None = None) -> dict[str, dict[str, float]]:
    result = {"trl": {"ratio": 1.0, "s_per_step": 0.1}, "topk": {"ratio": topk, "s_per_step": 0.1 * topk}}
    if colocated is not None:
        result["colocated"] = {"ratio": colocated, "s_per_step": 0.1 * colocated}
    return result


def test_headline_is_the_median_window_not_the_best_or_the_last(capsys):
    windows = [Path("w1"), Path("w2"), Path("w3")]
    ratio = median_over_windows(SPEC, windows, [_result(1.2, 0.9), _result(0.8, 0.95), _result(1.0, 0.93)])
    assert ratio == 0.93  # the demo's headline side: colocated
    out = capsys.readouterr().out
    assert "w2" in out and "median" in out and "1.00" in out  # topk's median is printed too


def test_a_side_missing_from_a_window_is_left_out_of_its_median():
    ratio = median_over_windows(SPEC, [Path("w1"), Path("w2")], [_result(1.1, 0.9), {"trl": _result(1.0)["trl"]}])
    assert ratio == 0.9


def test_no_asyncopd_side_gives_nan():
    assert math.isnan(median_over_windows(SPEC, [Path("w1")], [{}]))


def test_snapshot_digest_follows_the_bytes_of_a_file_or_a_directory(tmp_path):
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    a, b = tmp_path / "w1" / "step_10.pt", tmp_path / "w2" / "step_10.pt"  # as two windows name them
    torch.save({"w": torch.ones(3)}, a)
    torch.save({"w": torch.ones(3)}, b)
    assert snapshot_digest(a) == snapshot_digest(b)  # identical weights: scored once
    torch.save({"w": torch.ones(3) * 1.0001}, b)
    assert snapshot_digest(a) != snapshot_digest(b)
    d = tmp_path / "dcp"
    d.mkdir()
    (d / "x").write_bytes(b"1")
    first = snapshot_digest(d)
    (d / "x").write_bytes(b"2")
    assert snapshot_digest(d) != first


def test_time_to_interpolates_between_snapshots():
    curve = [(0, 0.0, 2.0), (10, 1.0, 1.5), (20, 2.0, 0.5)]
    step, seconds = time_to(curve, 1.0)
    assert step == 15 and seconds == 1.5
    assert time_to(curve, 0.1) is None
