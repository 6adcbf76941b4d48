"""How much does overlapping generation, scoring and training buy?

Runs the same job twice, at async.max_staleness=0 (synchronous: generate, score,
train, repeat) and at 1 (off-by-one: the three overlap), and compares the
per-step wall time. The ideal speedup is computed from the phase times measured
in the synchronous run, where each phase runs alone:

    ideal = (t_gen + t_score + t_train) / max(t_gen, t_score, t_train)

Each phase is everything its role does for one batch, read from the job's
timeline (``run.trace=true``, :mod:`asyncopd.trace`) over the steady steps:
t_gen is the actor's busy time per step (admitting prompts, engine steps,
shipping rollouts, loading weights), t_score the teacher's forward time, t_train
the learner's train step plus weight publication. (Engine steps alone, which
leave out a third of the actor's work, are printed beside it as t_engine; an
ideal from them would not bound anything.) The last line is
``async_speedup <measured> ideal <bound> efficiency <measured/bound>``.

That ideal assumes the synchronous step is the plain sum of the phases and that
the phases of *different* steps overlap completely. What this machine allows is
printed beside it (the line before last), as floors on the overlapped step:

- phase: step >= max(t_gen, t_score, t_train);
- staleness: batch k+1 may only be generated once the learner reaches version
  k+1-eta, so within eta+1 steps one batch must be generated and trained one
  after the other (its scoring streams alongside its generation):
  step >= (t_gen + t_train) / (eta + 1);
- cores: the synchronous run's CPU work per step, W = (busy fraction of all C
  cores) x C x its step time, measured machine-wide from /proc/stat, includes
  what no phase counts (messages, codecs, the OS); overlapping cannot shrink it,
  so step >= W / C.

"attainable" is the synchronous step over the largest floor: the ceiling of the
measured speedup here. The synchronous run already streams scoring alongside
generation, so its step is below the sum of the phases, and on few cores W / C
is the largest floor; "efficiency vs attainable" says how much of what the
cores allow the pipeline gets. Each run's line gives its cores' busy fraction
over the steady steps: near 100% at eta=1 means the cores, not the pipeline,
limit the overlap.

Usage: python bench/async_speedup.py [--steps N] [--warmup K] [--eta E] [extra overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import mean

from asyncopd import trace

REPO = Path(__file__).resolve().parents[1]


class CpuSampler:
    """Machine-wide CPU time from /proc/stat, sampled in the background, so that the
    busy fraction of all cores over any window of a run can be read afterwards."""

    def __init__(self, every_s: float = 0.1) -> None:
        self.samples: list[tuple[float, int, int]] = []  # (wall time, busy jiffies, total jiffies)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), daemon=True)

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self, every_s: float) -> None:
        while not self._stop.is_set():
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            idle = fields[3] + fields[4]  # idle + iowait
            self.samples.append((time.time(), sum(fields) - idle, sum(fields)))
            self._stop.wait(every_s)

    def busy_fraction(self, start: float, end: float) -> float:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return float("nan")
        (_, busy0, total0), (_, busy1, total1) = inside[0], inside[-1]
        return (busy1 - busy0) / max(total1 - total0, 1)


def run(eta: int, run_dir: Path, steps: int, extra: list[str]) -> tuple[list[dict], CpuSampler]:
    command = [sys.executable, "-m", "asyncopd.launch", f"async.max_staleness={eta}", f"learner.num_steps={steps}",
               "eval.enabled=false", "run.wandb=disabled", "run.progress=false", f"run.dir={run_dir}",
               "learner.export_hf=false", "run.trace=true", "learner.resume=null", *extra]
    print("running:", " ".join(command[1:]), flush=True)
    with CpuSampler() as cpu:
        subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "learner/loss" in x], cpu


def phase_times(run_dir: Path, records: list[dict], cpu: CpuSampler, warmup: int) -> dict[str, float]:
    """Per-step phase times over the steady steps (after ``warmup``, which must be >= 1)."""
    start, end, steps = records[warmup - 1]["time"], records[-1]["time"], len(records) - warmup
    seconds = trace.span_seconds(run_dir, start, end)

    def per_step(role: str, names: tuple[str, ...] | None = None) -> float:
        rows = [parts for row, parts in seconds.items() if row.startswith(role)]
        return max((sum(v for k, v in parts.items() if names is None or k in names) for parts in rows),
                   default=0.0) / steps

    engine = [r.get("actor/engine_busy_s", 0.0) for r in records]
    return {
        "step": mean(r["timing/step_s"] for r in records[warmup:]),
        "gen": per_step("actor"),
        "score": per_step("teacher"),
        "train": per_step("learner 0", ("train", "publish_weights", "checkpoint")),
        "engine": (engine[-1] - engine[warmup - 1]) / steps,
        "cpu": cpu.busy_fraction(start, end),  # all cores' busy fraction over the steady steps
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the averages (>= 1)")
    parser.add_argument("--eta", type=int, default=1, help="staleness bound of the overlapped run")
    args, extra = parser.parse_known_args()
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup}: must be in [1, --steps). Fix: pass e.g. --warmup 5 --steps 30.")
    with tempfile.TemporaryDirectory(prefix="asyncopd-bench-") as tmp:
        runs = {eta: Path(tmp) / f"eta{eta}" for eta in (0, args.eta)}
        sync = phase_times(runs[0], *run(0, runs[0], args.steps, extra), args.warmup)
        overlap = phase_times(runs[args.eta], *run(args.eta, runs[args.eta], args.steps, extra), args.warmup)
    phases = (sync["gen"], sync["score"], sync["train"])
    total = sum(phases)
    ideal = total / max(phases)
    cores = len(os.sched_getaffinity(0))
    floors = {"phase": max(phases), f"staleness (eta={args.eta})": (sync["gen"] + sync["train"]) / (args.eta + 1),
              f"cores (W={sync['cpu'] * cores * sync['step']:.3f} core-s/step)": sync["cpu"] * sync["step"]}
    binding = max(floors, key=floors.__getitem__)
    attainable = sync["step"] / floors[binding]
    measured = sync["step"] / overlap["step"]
    for eta, times in ((0, sync), (args.eta, overlap)):
        print(f"eta={eta} step {times['step']:.3f}s  (t_gen {times['gen']:.3f}s, t_score {times['score']:.3f}s, "
              f"t_train {times['train']:.3f}s; t_engine {times['engine']:.3f}s; "
              f"all {cores} cores {100 * times['cpu']:.0f}% busy)")
    print("floors of the overlapped step: " + ", ".join(f"{k} {v:.3f}s" for k, v in floors.items())
          + f"; attainable speedup {attainable:.3f} (= {attainable / ideal:.3f} of ideal, bound by {binding.split()[0]}), "
          f"efficiency vs attainable {measured / attainable:.3f}")
    print(f"async_speedup {measured:.3f} ideal {ideal:.3f} efficiency {measured / ideal:.3f}")


if __name__ == "__main__":
    main()
