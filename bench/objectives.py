"""Which distillation objective learns most per step?

Runs the demo task once per objective from the same student, on the same prompt
stream, with the same batch, learning rate and number of steps:

- ``opd``:  OPD as the advantage (sampled-token ``lp_teacher - lp_old``), teacher
            ranks (the default before ``loss.kl_loss=auto``);
- ``topk``: the exact reverse KL over teacher ∪ student top-16 plus a tail bucket,
            pure KD (``loss.pg_coef=0``), teacher ranks (what remote teachers allow;
            what ``loss.kl_loss=auto`` picks there, the demo's default);
- ``full``: the exact reverse KL over the whole vocabulary, pure KD, the teacher
            inside the learner (``teacher.backend=colocated``), as TRL's
            DistillationTrainer with ``beta=1`` (what ``auto`` picks there);
- ``opd_colocated`` (with ``--colocated-opd``): the OPD advantage with the
            teacher in the learner, to separate the objective from the data flow.

Each run evaluates the held-out reverse KL (``eval/rkl``, the student's own samples
scored by the teacher) every ``--eval-every`` steps. The number that matters is
the steps until ``eval/rkl`` first falls to half its starting value (linearly
interpolated between evaluations; a run that never gets there reports ``>N``).
Wall times on a shared machine are contended; step counts are not.

The last line is ``objectives steps_to_half opd <n> topk <n> full <n>``.

Usage: python bench/objectives.py [--steps N] [--eval-every N] [--only full,opd] [--out DIR] [overrides...]
       python bench/objectives.py --from-runs DIR   (re-analyse finished runs)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_POOL = ["teacher.backend=hf", "cluster.teachers=1"]
_COLOCATED = ["teacher.backend=colocated", "cluster.teachers=0"]
OBJECTIVES: dict[str, list[str]] = {  # each fully spelled out, whatever the defaults
    "opd": [*_POOL, "teacher.top_k=0", "loss.advantage=opd", "loss.kl_loss=none", "loss.pg_coef=1"],
    "topk": [*_POOL, "teacher.top_k=16", "loss.kl_loss=topk", "loss.pg_coef=0"],
    "full": [*_COLOCATED, "teacher.top_k=0", "loss.kl_loss=full", "loss.pg_coef=0"],
    "opd_colocated": [*_COLOCATED, "teacher.top_k=0", "loss.advantage=opd", "loss.kl_loss=none", "loss.pg_coef=1"],
}


def run(name: str, run_dir: Path, args: argparse.Namespace, extra: list[str]) -> float:
    command = [sys.executable, "-m", "asyncopd.launch", *OBJECTIVES[name], f"learner.num_steps={args.steps}",
               f"eval.every_steps={args.eval_every}", "run.wandb=disabled", "run.progress=false",
               "learner.export_hf=false", f"run.dir={run_dir}", f"run.name=objectives-{name}", *extra]
    print("running:", " ".join(command[2:]), flush=True)
    start = time.perf_counter()
    with open(run_dir.with_suffix(".log"), "w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"{name} run failed (exit {result.returncode}); see {run_dir.with_suffix('.log')}")
    return time.perf_counter() - start


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(policy version, eval/rkl, eval/accuracy) per evaluation."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = sorted((r for r in records if "eval/rkl" in r), key=lambda r: r["step"])
    return [(r["step"], r["eval/rkl"], r["eval/accuracy"]) for r in evals]


def steps_to(points: list[tuple[int, float, float]], target: float) -> float | None:
    """First step at which eval/rkl reaches ``target`` (interpolated); None if never."""
    for (s0, r0, _), (s1, r1, _) in zip(points, points[1:]):
        if r1 <= target:
            return s0 + (s1 - s0) * (r0 - target) / (r0 - r1) if r0 > target else float(s0)
    return None


def seconds_per_step(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["timing/step_s"] for r in records if "timing/step_s" in r]
    tail = steps[len(steps) // 5:]  # skip the start-up
    return sum(tail) / max(len(tail), 1)


def report(out: Path, names: list[str], walls: dict[str, float | None]) -> None:
    rows, halves = [], {}
    for name in names:
        points = curve(out / name)
        start = points[0][1]
        half = steps_to(points, start / 2)
        halves[name] = half
        summary = json.loads((out / name / "summary.json").read_text())
        wall = walls.get(name) or summary["wall_s"]
        rows.append((name, start, half, points[-1][0], points[-1][1], points[-1][2], seconds_per_step(out / name), wall))
        print(f"{name}: " + ", ".join(f"{s}:{r:.3f}" for s, r, _ in points))
    print("\n| objective | eval/rkl start | steps to half | eval/rkl at step | accuracy | s/step (contended) | job wall s |")
    print("|---|---|---|---|---|---|---|")
    for name, start, half, last, rkl, acc, sps, wall in rows:
        shown = f"{half:.0f}" if half is not None else f">{last}"
        print(f"| {name} | {start:.3f} | {shown} | {rkl:.3f} @ {last} | {acc:.3f} | {sps:.3f} | {wall:.0f} |")
    print("objectives steps_to_half " + " ".join(
        f"{name} {'%.0f' % halves[name] if halves[name] is not None else 'never'}" for name in names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--only", default="opd,topk,full", help="comma-separated objectives")
    parser.add_argument("--colocated-opd", action="store_true", help="also run opd_colocated")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "objectives")
    parser.add_argument("--from-runs", type=Path, default=None, help="only re-analyse the runs in this directory")
    args, extra = parser.parse_known_args()
    names = args.only.split(",") + (["opd_colocated"] if args.colocated_opd else [])
    if args.from_runs is not None:
        report(args.from_runs, [n for n in names if (args.from_runs / n / "metrics.jsonl").is_file()], {})
        return
    args.out.mkdir(parents=True, exist_ok=True)
    walls = {name: run(name, args.out / name, args, extra) for name in names}
    report(args.out, names, walls)


if __name__ == "__main__":
    main()
