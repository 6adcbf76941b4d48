"""Curves of a sweep's evaluation metrics: one PNG per ``eval/*`` key, two panels
(against policy version and against wall time), one line per combination with its
95% t-band over replicates. matplotlib's object API (no pyplot, no global state)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from asyncopd.report.runs import Run
from asyncopd.report.stats import mean_ci

__all__ = ["plot_metric", "plot_name"]

_GRID_POINTS = 60


def plot_name(key: str) -> str:
    return key.replace("/", "_") + ".png"


def _band(columns: list[list[float]], level: float) -> tuple[np.ndarray, np.ndarray]:
    cis = [mean_ci(c, level) for c in columns]
    return np.array([c.mean for c in cis]), np.array([c.half_width for c in cis])


def by_step(runs: list[Run], key: str, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(versions, mean, half-width) over the runs' evaluations at each version."""
    values: dict[float, list[float]] = {}
    for run in runs:
        for version, _, value in zip(*run.curve(key)):
            values.setdefault(version, []).append(value)
    xs = sorted(values)
    mean, half = _band([values[x] for x in xs], level)
    return np.array(xs, dtype=float), mean, half


def by_time(runs: list[Run], key: str, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds, mean, half-width): each run's curve interpolated onto the time span all runs cover."""
    curves = [(np.array(t), np.array(v)) for _, t, v in (run.curve(key) for run in runs) if len(t)]
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    if len(curves) == 1:
        t, v = curves[0]
        return t, v, np.full(len(t), math.nan)
    start, end = max(t[0] for t, _ in curves), min(t[-1] for t, _ in curves)
    if end <= start:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    grid = np.linspace(start, end, _GRID_POINTS)
    columns = np.stack([np.interp(grid, t, v) for t, v in curves], axis=1)
    mean, half = _band([list(row) for row in columns], level)
    return grid, mean, half


def plot_metric(groups: dict[str, list[Run]], key: str, path: Path, *, level: float = 0.95) -> Path:
    """Write ``key`` against policy version and wall time for every combination to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    for i, (name, runs) in enumerate(groups.items()):
        color = f"C{i % 10}"
        label = f"{name} (n={len(runs)})"
        for axis, (x, mean, half) in zip(axes, (by_step(runs, key, level), by_time(runs, key, level))):
            if not len(x):
                continue
            axis.plot(x, mean, color=color, marker="o" if len(x) < 12 else None, markersize=3, label=label)
            ok = np.isfinite(half)
            if ok.any():
                axis.fill_between(x[ok], (mean - half)[ok], (mean + half)[ok], color=color, alpha=0.2, linewidth=0)
    axes[0].set_xlabel("policy version (optimiser steps)")
    axes[1].set_xlabel("wall time since the run's first metrics record (s)")
    axes[0].set_ylabel(key)
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    figure.suptitle(f"{key}: mean over seeds, {level:.0%} t-band")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path
