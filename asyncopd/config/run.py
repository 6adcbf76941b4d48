"""``eval`` and ``run``: evaluation, and where and how a run is recorded.

Part of :mod:`asyncopd.config` (import from there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from asyncopd.config._base import _check_positive


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Held-out evaluation: greedy accuracy, sampled reverse KL to the teacher, the NLL of
    the teacher's own samples, diversity and the collapse verdict (asyncopd/quality.py)."""

    every_steps: int | None = None
    """Also evaluate every N steps; None: only before and after training."""
    enabled: bool = True
    """Evaluate before and after training (the summary's eval/* fields)."""
    rkl_samples: int = 4
    """Temperature-1 samples per held-out prompt behind eval/rkl, the Monte-Carlo
    estimate of the per-token reverse KL to the teacher (more = less noise)."""
    teacher_samples: bool = True
    """The rank holding the teacher (teacher rank 0; learner rank 0 with
    teacher.backend=colocated) samples one reference answer per held-out prompt at start-up
    (T=1, seeded by actor.seed, up to actor.max_new_tokens); every evaluation then
    reports the student's NLL of them (eval/teacher_sample_nll) and compares the
    student's diversity with the teacher's. False: skip those measures (the collapse
    verdict then compares the student with its own start)."""
    logged_samples: int = 4
    """Held-out prompts whose student sample and teacher reference are appended, as
    text, to <run dir>/samples.jsonl (and a wandb table) at every evaluation; 0: none."""

    def __post_init__(self) -> None:
        _check_positive("eval", self, "every_steps", "rkl_samples")
        _check_positive("eval", self, "logged_samples", allow_zero=True)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where a run writes and how it reports."""

    name: str = "demo"
    """Run name; the run directory defaults to runs/<name>."""
    dir: str | None = None
    """Run directory (config, metrics.jsonl, checkpoints, hf export, summary.json).
    None: runs/<name> under the current directory."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline writes under the run directory and needs no network."""
    progress: bool = True
    """Show a live progress bar on the console (learner rank 0)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level of every role."""
    trace: bool = False
    """Record a timeline of every process (engine steps, weight loads, teacher forwards,
    batch waits, train steps) into <run dir>/trace.json, for https://ui.perfetto.dev;
    see asyncopd/trace.py."""
    seed: int = 0
    """Replicate seed: moves every random stream of the job at once (training prompt
    stream, actor sampling, learner RNG; see asyncopd/seeds.py) and nothing else (the
    held-out prompts and demo models follow task.seed). 0 = the streams actor.seed,
    learner.seed and task.seed give on their own. A sweep may sweep it
    (run.seed=range(3)): each value is a replicate, not a combination."""
    seeds: int = 1
    """Replicates per combination: with N > 1, ``python -m asyncopd.launch`` (with or
    without -m) runs each combination N times with run.seed = run.seed, ..., run.seed+N-1,
    each in <sweep dir>/<combination>/seed=<k>/, and writes the report
    (python -m asyncopd.report). 1 = one run per combination."""

    def __post_init__(self) -> None:
        _check_positive("run", self, "seeds")
        _check_positive("run", self, "seed", allow_zero=True)

    @property
    def run_dir(self) -> Path:
        return Path(self.dir) if self.dir is not None else Path("runs") / self.name
