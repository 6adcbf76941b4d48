"""The report of a sweep: ``python -m asyncopd.report runs/<sweep> [--baseline key=value]``.

Written at the end of every sweep too. Per combination of the sweep, over its
replicate seeds (``run.seeds=N``): mean and 95% t-interval of every final ``eval/*``
metric (accuracy, reverse KL, and whatever else the evaluation records), seconds per
step, samples dropped and wall time; the difference of each combination to its
baseline with Welch's 95% interval, marked when that interval excludes zero
("outside the noise"); and one PNG per ``eval/*`` metric against policy version and
against wall time, with bands. Output: ``<dir>/report.md``, ``<dir>/report.json``,
``<dir>/plots/*.png``.

The baseline is the first combination, or the one ``--baseline`` names. A partial
baseline such as ``async.max_staleness=0`` in an η × correction sweep compares each
combination with the one that differs from it only in those keys (η = 0 with the
same correction).

This package reads run directories; it never starts a job.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from asyncopd.report.plots import plot_metric, plot_name
from asyncopd.report.runs import SPEED_KEYS, Run, load_runs, split_tag
from asyncopd.report.stats import Difference, MeanCI, mean_ci, welch_difference

__all__ = ["Report", "build_report", "write_report", "ReportError"]

logger = logging.getLogger(__name__)

_CONSOLE_KEYS = ("eval/accuracy", "eval/rkl", "s/step")


class ReportError(ValueError):
    """A report that cannot be made as asked; the message names the fix."""


@dataclass(slots=True)
class Combination:
    name: str
    runs: list[Run]
    failed: int
    measures: dict[str, MeanCI] = field(default_factory=dict)
    baseline: str | None = None
    differences: dict[str, Difference] = field(default_factory=dict)


@dataclass(slots=True)
class Report:
    base: Path
    combinations: list[Combination]
    keys: list[str]
    eval_keys: list[str]
    level: float
    plots: dict[str, Path] = field(default_factory=dict)

    def console_lines(self) -> list[str]:
        """Mean ± CI per combination and the difference to its baseline (``*``: outside the noise)."""
        keys = [k for k in _CONSOLE_KEYS if k in self.keys]
        header = ["combination", "n", *[f"{k}" for k in keys], *[f"Δ {k}" for k in keys if k.startswith("eval/")]]
        rows = [header]
        for c in self.combinations:
            row = [c.name, str(len(c.runs))]
            row += [_ci(c.measures.get(k)) for k in keys]
            row += [_diff(c.differences.get(k)) if c.baseline else "(baseline)" for k in keys if k.startswith("eval/")]
            rows.append(row)
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.append(f"mean ± {self.level:.0%} t-interval over seeds; Δ = against the baseline with Welch's "
                     f"{self.level:.0%} interval, * = outside the noise (interval excludes 0)")
        return lines

    def markdown(self) -> str:
        level = f"{self.level:.0%}"
        out = [f"# Sweep report: `{self.base}`", ""]
        total = sum(len(c.runs) for c in self.combinations)
        failed = sum(c.failed for c in self.combinations)
        out += [f"{len(self.combinations)} combinations, {total} successful runs"
                + (f", {failed} failed runs (left out)" if failed else "") + ". "
                f"Values: mean ± half-width of the {level} Student-t interval over replicate seeds "
                "(n = runs; no interval with n = 1). Final eval metrics are those of the last evaluation.", ""]
        out += ["## Final measures", "", _md_table(
            ["combination", "n", *self.keys],
            [[f"`{c.name}`", str(len(c.runs)), *[_ci(c.measures.get(k)) for k in self.keys]]
             for c in self.combinations])]
        compared = [c for c in self.combinations if c.baseline]
        if compared:
            out += ["", "## Differences against the baseline", "",
                    f"combination − baseline, Welch {level} interval; **bold** = outside the noise (the interval "
                    "excludes 0).", "", _md_table(
                        ["combination", "baseline", *self.keys],
                        [[f"`{c.name}`", f"`{c.baseline}`", *[_diff(c.differences.get(k), md=True) for k in self.keys]]
                         for c in compared])]
        if self.plots:
            out += ["", "## Curves", "", f"Mean over seeds with the {level} t-band; left against policy version, "
                    "right against seconds since each run's first metrics record (runs interpolated onto the "
                    "span all of them cover).", ""]
            out += [f"![{key}](plots/{path.name})" for key, path in self.plots.items()]
        out += ["", "## Runs", "", _md_table(
            ["combination", "seed", "run directory"],
            [[f"`{c.name}`", str(r.seed), f"`{_relative(r.run_dir, self.base)}`"]
             for c in self.combinations for r in c.runs])]
        return "\n".join(out) + "\n"

    def as_json(self) -> dict:
        def ci(m: MeanCI) -> dict:
            return {"mean": _nan_none(m.mean), "half_width": _nan_none(m.half_width), "n": m.n}

        def diff(d: Difference) -> dict:
            return {"diff": _nan_none(d.diff), "half_width": _nan_none(d.half_width),
                    "df": _nan_none(d.df), "outside_noise": d.outside_noise}

        return {"level": self.level, "combinations": [
            {"name": c.name, "n": len(c.runs), "failed": c.failed, "seeds": [r.seed for r in c.runs],
             "measures": {k: ci(m) for k, m in c.measures.items()},
             "values": {k: [r.final().get(k) for r in c.runs] for k in c.measures},
             "baseline": c.baseline, "differences": {k: diff(d) for k, d in c.differences.items()}}
            for c in self.combinations]}


def _relative(path: Path, base: Path) -> Path:
    try:
        return path.resolve().relative_to(base.resolve())
    except ValueError:
        return path


def _nan_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _ci(m: MeanCI | None) -> str:
    if m is None or m.n == 0:
        return "-"
    return _fmt(m.mean) if math.isnan(m.half_width) else f"{_fmt(m.mean)} ± {_fmt(m.half_width)}"


def _diff(d: Difference | None, md: bool = False) -> str:
    if d is None:
        return "-"
    sign = "+" if d.diff >= 0 else ""
    text = f"{sign}{_fmt(d.diff)}" + ("" if math.isnan(d.half_width) else f" ± {_fmt(d.half_width)}")
    if d.outside_noise:
        return f"**{text}**" if md else f"{text} *"
    return text


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _baseline_of(name: str, names: list[str], baseline: dict[str, str]) -> str | None:
    """The combination ``name`` is compared with: ``name`` with the baseline's keys set."""
    items = split_tag(name)
    target = {**items, **baseline}
    if target == items:
        return None  # it is a baseline itself
    match = [n for n in names if split_tag(n) == target]
    return match[0] if match else None


def build_report(base: Path, *, baseline: str | None = None, level: float = 0.95) -> Report:
    runs = load_runs(Path(base))
    names = list(dict.fromkeys(r.combination for r in runs))
    groups = {n: [r for r in runs if r.combination == n and r.ok] for n in names}
    failed = {n: sum(1 for r in runs if r.combination == n and not r.ok) for n in names}
    finals = {n: [r.final() for r in groups[n]] for n in names}
    all_keys = {k for rows in finals.values() for row in rows for k in row}
    eval_keys = ["eval/accuracy", "eval/rkl"]
    eval_keys = [k for k in eval_keys if k in all_keys] + sorted(
        k for k in all_keys if k.startswith("eval/") and k not in eval_keys)
    keys = eval_keys + [k for k in SPEED_KEYS if k in all_keys]
    wanted = split_tag(baseline) if baseline is not None else split_tag(names[0]) if names else {}
    if baseline is not None and not any(all(split_tag(n).get(k) == v for k, v in wanted.items()) for n in names):
        raise ReportError(f"--baseline {baseline!r} matches no combination of {base}. Fix: use one of "
                          f"{', '.join(names)} (or some of its key=value items).")
    combinations = []
    for n in names:
        c = Combination(name=n, runs=groups[n], failed=failed[n])
        c.measures = {k: mean_ci([row[k] for row in finals[n] if k in row], level) for k in keys}
        c.baseline = _baseline_of(n, names, wanted)
        if c.baseline is not None:
            other = finals[c.baseline]
            c.differences = {k: welch_difference([row[k] for row in finals[n] if k in row],
                                                 [row[k] for row in other if k in row], level) for k in keys}
        combinations.append(c)
    return Report(base=Path(base), combinations=combinations, keys=keys, eval_keys=eval_keys, level=level)


def write_report(base: Path, *, baseline: str | None = None, level: float = 0.95) -> Report:
    """Build the report of the sweep under ``base`` and write report.md, report.json and plots/."""
    report = build_report(base, baseline=baseline, level=level)
    groups = {c.name: c.runs for c in report.combinations if c.runs}
    try:
        import matplotlib  # noqa: F401  (the plots' only extra dependency)
    except ImportError:
        logger.warning("matplotlib is not installed: report.md without plots (pip install 'asyncopd[report]')")
        groups = {}
    for key in report.eval_keys if groups else ():
        if any(run.curve(key)[0] for runs in groups.values() for run in runs):
            report.plots[key] = plot_metric(groups, key, report.base / "plots" / plot_name(key), level=level)
    (report.base / "report.md").write_text(report.markdown())
    (report.base / "report.json").write_text(json.dumps(report.as_json(), indent=2))
    return report
