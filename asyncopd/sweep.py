"""Sweeps: ``python -m asyncopd.launch -m async.max_staleness=0,1,2 ...``.

Hydra's multirun syntax (``key=a,b,c``, ``key=range(0,3)``, ``key=choice(a,b)``)
expands, as hydra's basic sweeper does, into the cartesian product of the swept
values; the jobs run one after another, each a whole torchrun world of its own.
Every combination is composed and validated before the first job starts, so an
impossible cell of the grid fails at once, naming itself.

Each job writes to ``<base>/<swept key=value,...>/`` where ``<base>`` is
``run.dir`` (or ``runs/<run.name>``); at the end ``<base>/sweep.json`` holds every
job's overrides, exit code and ``summary.json``, and a table compares them (wall
time, seconds per step, accuracy and reverse KL before/after, observed staleness,
dropped samples). A job that fails is reported and the sweep goes on; the sweep
then exits non-zero.

Replicates: ``run.seeds=N`` (or a swept ``run.seed=a,b,...``) runs every combination
once per replicate seed, in ``<base>/<combination>/seed=<k>/``. The sweep ends with
``<base>/report.md`` (:mod:`asyncopd.report`: mean ± t-interval per combination,
differences to the first combination with Welch intervals, plots), and its
comparison on the console.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any, Callable

from asyncopd.config import ConfigError, JobConfig, RunConfig

__all__ = ["MULTIRUN_FLAGS", "expand", "plan", "run_sweep"]

logger = logging.getLogger("asyncopd.sweep")

MULTIRUN_FLAGS = ("-m", "--multirun")


def expand(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """(every combination of ``overrides``, as lists of key=value; the swept keys)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"{exc}. Fix: write sweeps as key=a,b,c or key=range(start,stop[,step]).") from None
    choices: list[list[str]] = []
    swept: list[str] = []
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            choices.append([f"{key}={override.get_value_element_as_str()}"])
            continue
        if not override.is_discrete_sweep():
            raise ConfigError(f"{override.input_line!r}: an interval sweep has no finite list of values. "
                              "Fix: list the values (key=a,b,c) or use range(start,stop,step).")
        if key.lstrip("+~") == "run.seed":  # the replicate axis, not a combination (see plan)
            swept.append("run.seed")
            choices.append([f"run.seed={value}" for value in override.sweep_string_iterator()])
            continue
        if key.lstrip("+~").startswith("run."):
            raise ConfigError(f"{override.input_line!r}: run.* settings name where a sweep writes and cannot be "
                              "swept. Fix: sweep job settings only; set run.name or run.dir once for the sweep.")
        swept.append(key)
        choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
    return [list(combo) for combo in itertools.product(*choices)], swept


def _tag(combo: list[str], swept: list[str]) -> str:
    parts = [item for item in combo if item.split("=", 1)[0] in swept and item.split("=", 1)[0] != "run.seed"]
    return ",".join(parts).replace("/", "_") or "job"


def _quoted(value: str) -> str:
    """``value`` as one hydra override value (a tag holds '=' and ',')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _replicates(combos: list[list[str]], swept: list[str], first: RunConfig) -> list[tuple[list[str], int | None]]:
    """Each combination with each replicate seed (None: a single run, no seed directory)."""
    if "run.seed" in swept:
        if first.seeds != 1:
            raise ConfigError(f"run.seeds={first.seeds} with a swept run.seed: two ways of giving replicates. "
                              "Fix: use one of them (run.seeds=N or run.seed=a,b,...).")
        return [([c for c in combo if not c.startswith("run.seed=")], int(_value(combo, "run.seed")))
                for combo in combos]
    if first.seeds == 1:
        return [(combo, None) for combo in combos]
    return [(combo, first.seed + k) for combo in combos for k in range(first.seeds)]


def _value(combo: list[str], key: str) -> str:
    return next(c.split("=", 1)[1] for c in combo if c.split("=", 1)[0].lstrip("+~") == key)


def plan(options: list[str], overrides: list[str],
         compose: Callable[[list[str]], JobConfig]) -> tuple[Path, list[tuple[str, list[str], JobConfig]]]:
    """The sweep's base directory and its jobs: (tag, argv, validated config) each.

    A job's tag names its combination (``key=value,...``); replicates (``run.seeds=N`` or
    a swept ``run.seed``) share their combination's tag and run in ``<tag>/seed=<k>/``
    (``seed=<k>/`` when nothing else is swept)."""
    combos, swept = expand(overrides)
    first = compose([*options, *combos[0]]).run  # run.* (but run.seed) is never swept: one value per sweep
    if not swept and first.seeds == 1:
        raise ConfigError("-m/--multirun without a swept value. Fix: give at least one key=a,b,... or "
                          "run.seeds=N for N replicates (or drop -m to run a single job).")
    base, name = first.run_dir, first.name
    jobs = []
    for combo, seed in _replicates(combos, swept, first):
        tag = _tag(combo, swept)
        where = tag if tag != "job" or seed is None else ""
        if seed is not None:
            where = f"{where}/seed={seed}" if where else f"seed={seed}"
        fixed = ("run.dir=", "run.name=", "run.seeds=", "run.seed=") if seed is not None else ("run.dir=", "run.name=")
        argv = [*options, *[c for c in combo if not c.startswith(fixed)]]
        if seed is not None:
            argv += [f"run.seed={seed}", "run.seeds=1"]
        argv += [f"run.dir={_quoted(str(base / where))}", f"run.name={_quoted(name + '-' + where.replace('/', '-'))}"]
        try:
            cfg = compose(argv)
        except ConfigError as exc:
            raise ConfigError(f"sweep job {where}: {exc}") from None
        jobs.append((tag, argv, cfg))
    return base, jobs


def run_sweep(options: list[str], overrides: list[str], *, compose: Callable[[list[str]], JobConfig],
              spawn: Callable[[JobConfig, list[str]], int]) -> int:
    """Run every job of the sweep in turn; 0 when all succeeded."""
    base, jobs = plan(options, overrides, compose)
    names = [str(cfg.run.run_dir.relative_to(base)) for _, _, cfg in jobs]
    logger.info("sweep of %d jobs under %s: %s", len(jobs), base, ", ".join(names))
    results: list[dict[str, Any]] = []
    for i, (tag, argv, cfg) in enumerate(jobs, 1):
        logger.info("sweep job %d/%d: %s", i, len(jobs), names[i - 1])
        code = spawn(cfg, argv)
        summary_path = cfg.run.run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if code == 0 and summary_path.is_file() else None
        results.append({"job": tag, "seed": cfg.run.seed, "overrides": argv, "run_dir": str(cfg.run.run_dir),
                        "returncode": code, "summary": summary})
        base.mkdir(parents=True, exist_ok=True)
        (base / "sweep.json").write_text(json.dumps(results, indent=2))  # after every job: a crash keeps the rest
    for line in table(results):
        logger.info("%s", line)
    _report(base, results)
    failed = [r["job"] for r in results if r["returncode"] != 0]
    if failed:
        logger.error("%d of %d sweep jobs failed: %s (logs above; their run directories hold what they wrote)",
                     len(failed), len(results), ", ".join(failed))
    return 1 if failed else 0


def _report(base: Path, results: list[dict[str, Any]]) -> None:
    """Write <base>/report.md (asyncopd.report) and show its comparison; a report that
    cannot be made is logged, never a reason to fail the sweep's jobs."""
    if not any(r["returncode"] == 0 for r in results):
        return
    try:
        from asyncopd.report import write_report

        report = write_report(base)
    except Exception:
        logger.exception("the sweep report could not be written (rerun: python -m asyncopd.report %s)", base)
        return
    for line in report.console_lines():
        logger.info("%s", line)
    logger.info("report: %s", base / "report.md")


def table(results: list[dict[str, Any]]) -> list[str]:
    """The sweep's jobs side by side."""
    header = ("job", "exit", "wall s", "s/step", "accuracy", "reverse KL", "staleness", "dropped")
    rows = [header]
    replicated = len({r["job"] for r in results}) < len(results)
    for r in results:
        s = r["summary"] or {}
        steps = (s.get("policy_version") or 0) - (s.get("start_policy_version") or 0)
        rows.append((
            f"{r['job']} seed={r.get('seed')}" if replicated else r["job"], str(r["returncode"]), _num(s.get("wall_s"), ".0f"),
            _num(s["train_wall_s"] / steps if steps and s.get("train_wall_s") else None, ".3f"),
            f"{_num(s.get('eval/accuracy_before'), '.3f')} -> {_num(s.get('eval/accuracy_after'), '.3f')}",
            f"{_num(s.get('eval/rkl_before'), '.3f')} -> {_num(s.get('eval/rkl_after'), '.3f')}",
            f"{s.get('buffer/staleness_max', '-')} (<= {s.get('async/max_staleness', '-')})",
            str(s.get("samples_dropped_stale", "-")),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)
