"""How much does overlapping generation, scoring and training buy?

Runs the same job twice, at async.max_staleness=0 (synchronous: generate, score,
train, repeat) and at 1 (off-by-one: the three overlap), and compares the
per-step wall time. The ideal speedup is computed from the phase times measured
in the synchronous run, where each phase runs alone:

    ideal = (t_gen + t_score + t_train) / max(t_gen, t_score, t_train)

t_gen is the actor's engine time per step, t_score the teacher forward time per
batch, t_train the learner's train step plus weight publication. The last line is
``async_speedup <measured> ideal <bound> efficiency <measured/bound>``.

That ideal assumes the three phases of *different* steps overlap completely. Two
further limits are printed beside it (the line before last), both also from the
synchronous run's phase times:

- staleness: batch k+1 may only be generated once the learner reaches version
  k+1-eta, so within eta+1 steps one batch must be generated and trained one
  after the other (its scoring streams alongside its generation):
  step >= (t_gen + t_train) / (eta + 1).
- cores: each role runs on its own thread budget (1 thread each by default), so
  with C cores a step needs at least (t_gen + t_score + t_train) / C.

"attainable" is the sum over the largest of these per-step floors; on a 2-core
machine with balanced phases it, not the ideal, is the ceiling of the speedup.

Usage: python bench/async_speedup.py [--steps N] [--warmup K] [--eta E] [extra overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

REPO = Path(__file__).resolve().parents[1]


def run(eta: int, run_dir: Path, steps: int, extra: list[str]) -> list[dict]:
    command = [sys.executable, "-m", "asyncopd.launch", f"async.max_staleness={eta}", f"learner.num_steps={steps}",
               "eval.enabled=false", "run.wandb=disabled", "run.progress=false", f"run.dir={run_dir}",
               "learner.export_hf=false", *extra]
    print("running:", " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "learner/loss" in x]


def phase_times(records: list[dict], warmup: int) -> dict[str, float]:
    steady = records[warmup:]
    busy = [r.get("actor/engine_busy_s", 0.0) for r in records]
    return {
        "step": mean(r["timing/step_s"] for r in steady),
        "gen": (busy[-1] - busy[warmup - 1]) / (len(records) - warmup) if warmup else busy[-1] / len(records),
        "score": mean(r["teacher/score_s"] for r in steady),
        "train": mean(r["timing/train_s"] + r["timing/weight_sync_s"] for r in steady),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--eta", type=int, default=1, help="staleness bound of the overlapped run")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="asyncopd-bench-") as tmp:
        sync = phase_times(run(0, Path(tmp) / "eta0", args.steps, extra), args.warmup)
        overlap = phase_times(run(args.eta, Path(tmp) / f"eta{args.eta}", args.steps, extra), args.warmup)
    phases = (sync["gen"], sync["score"], sync["train"])
    total = sum(phases)
    ideal = total / max(phases)
    cores = len(os.sched_getaffinity(0))
    staleness_floor = (sync["gen"] + sync["train"]) / (args.eta + 1)
    attainable = total / max(max(phases), staleness_floor, total / cores)
    measured = sync["step"] / overlap["step"]
    for eta, times in ((0, sync), (args.eta, overlap)):
        print(f"eta={eta} step {times['step']:.3f}s  (t_gen {times['gen']:.3f}s, t_score {times['score']:.3f}s, "
              f"t_train {times['train']:.3f}s)")
    print(f"limits: speedup <= {total / staleness_floor:.3f} by staleness (eta={args.eta}), "
          f"<= {cores} by cores; attainable {attainable:.3f} (= {attainable / ideal:.3f} of ideal), "
          f"efficiency vs attainable {measured / attainable:.3f}")
    print(f"async_speedup {measured:.3f} ideal {ideal:.3f} efficiency {measured / ideal:.3f}")


if __name__ == "__main__":
    main()
