"""The only place that writes metrics: JSONL in the run directory, wandb (offline
unless asked) and the console progress bar. Used by learner rank 0.

Besides ``metrics.jsonl``, every evaluation's readable prompt/completion pairs go
to ``samples.jsonl`` (one line per pair, with its ``step``) and to a wandb table
(``eval/samples``).

Metric keys are namespaced (``learner/…``, ``actor/…``, ``teacher/…``,
``buffer/…``, ``timing/…``, ``eval/…``). One JSONL line per call of
:meth:`MetricsWriter.log` (with its wall-clock ``time``), flushed at once, so a
crashed run keeps its history.

A restarted run continues the same file: :func:`supersede_metrics` first moves
the records of steps after its checkpoint (trained again now) to
``metrics.superseded.jsonl``, so that ``metrics.jsonl`` holds one line per step
and one per evaluated version.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

__all__ = ["MetricsWriter", "supersede_metrics", "SUPERSEDED_FILE"]

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"

_BAR_KEYS = {"learner/rkl": "rkl", "buffer/staleness_max": "stale", "timing/step_s": "step_s"}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsWriter:
    def __init__(self, run_dir: Path, *, config: dict[str, Any], total_steps: int, initial_step: int,
                 wandb_mode: str, progress: bool, run_name: str) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = (run_dir / METRICS_FILE).open("a", buffering=1)
        self._samples_path = run_dir / "samples.jsonl"
        self._wandb = None
        if wandb_mode != "disabled":
            try:
                import wandb

                self._wandb = wandb.init(project="asyncopd", name=run_name, dir=str(run_dir), mode=wandb_mode,
                                         config=config, settings=wandb.Settings(silent=True))
                # Every chart's x axis is the record's own "step" (the policy version), not
                # wandb's call counter: an evaluation of version k arrives after step k+1 was
                # logged, and log(step=k) would then be dropped as out of order.
                self._wandb.define_metric("step")
                self._wandb.define_metric("*", step_metric="step")
            except Exception as exc:  # metrics must never take the job down
                logger.warning("wandb is unavailable (%s); metrics go to metrics.jsonl only", exc)
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="asyncopd", unit="step",
                         dynamic_ncols=True) if progress else None

    def log(self, metrics: dict[str, Any], *, step: int) -> None:
        record = {"step": step, "time": time.time(), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if v is not None})

    def log_samples(self, rows: list[dict[str, Any]], *, step: int) -> None:
        """Append readable samples (same keys in every row) to samples.jsonl and log them as
        a wandb table. The file exists after the first call, even with no rows."""
        with self._samples_path.open("a") as file:
            for row in rows:
                file.write(json.dumps({"step": step, **row}) + "\n")
        if self._wandb is not None and rows:
            try:
                import wandb

                columns = ["step", *rows[0]]
                table = wandb.Table(columns=columns, data=[[step, *row.values()] for row in rows])
                self._wandb.log({"eval/samples": table, "step": step})
            except Exception as exc:  # metrics must never take the job down
                logger.warning("wandb: could not log the eval samples table (%s)", exc)

    def advance(self, metrics: dict[str, Any]) -> None:
        if self._bar is None:
            return
        shown = {short: f"{metrics[key]:.3g}" for key, short in _BAR_KEYS.items()
                 if isinstance(metrics.get(key), (int, float))}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(1)

    def write_line(self, text: str) -> None:
        """A message on the console that does not break the progress bar."""
        if self._bar is not None:
            self._bar.write(text)
        else:
            logger.info("%s", text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def supersede_metrics(run_dir: Path, keep_through_step: int | None,
                      attempt: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Before a run (re)starts: keep the records of ``metrics.jsonl`` with ``step <=
    keep_through_step`` (None: none, a fresh start) and move the others, tagged
    ``superseded_by_attempt``, to ``metrics.superseded.jsonl``. Returns (kept,
    superseded) records. The file is replaced atomically; a torn last line (a crash mid-write) is
    dropped."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return [], []
    kept: list[dict[str, Any]] = []
    superseded: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step")
        keep = keep_through_step is not None and isinstance(step, int) and step <= keep_through_step
        (kept if keep else superseded).append(record)
    if superseded:
        now = time.time()
        with (run_dir / SUPERSEDED_FILE).open("a") as f:
            for record in superseded:
                f.write(json.dumps({**record, "superseded_by_attempt": attempt, "superseded_at": now}) + "\n")
        logger.info("metrics.jsonl: %d records after step %s moved to %s (trained again now)", len(superseded),
                    keep_through_step, SUPERSEDED_FILE)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)
    return kept, superseded
