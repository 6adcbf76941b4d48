"""How many student tokens does on-policy distillation save over RL?

Runs the demo task three times from the same student, on the same prompt
stream, with the same number of sampled responses per step (the same
generation, scoring and training compute per step):

- ``opd``:      OPD as the advantage, one sample per prompt;
- ``grpo``:     GRPO (group-normalised verifier reward), ``--group`` samples per prompt;
- ``grpo+opd``: GRPO with the OPD term as a per-token penalty (slime's
  ``--opd-kl-coef``), ``--group`` samples per prompt.

Each run evaluates held-out greedy accuracy every ``--eval-every`` steps. For
each method the script reports the student tokens generated for training until
the held-out accuracy first reaches the target, ``--target-frac`` times the demo
teacher's accuracy, and draws accuracy and reverse KL against tokens generated
(``curves.png`` in ``--out``). A method that never reaches the target within
``--steps`` counts as the tokens of its whole run, which makes the ratio a lower
bound (said so on the line before the last).

The last line is ``opd_vs_grpo token_ratio <GRPO tokens / OPD tokens>``.

Usage: python bench/opd_vs_grpo.py [--steps N] [--out DIR] [extra hydra overrides...]
(plotting needs matplotlib: pip install -e '.[bench]').
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# loss.kl_loss=none: the sampled-token OPD advantage of the OPD write-ups (the claim under
# test) and plain GRPO, not the job's default top-k KL, so the recorded results stay comparable.
METHODS: dict[str, list[str]] = {
    "opd": ["loss.advantage=opd", "loss.kl_loss=none", "actor.samples_per_prompt=1"],
    "grpo": ["loss.advantage=grpo", "loss.kl_loss=none"],
    "grpo+opd": ["loss.advantage=grpo", "loss.kl_loss=none", "loss.opd_penalty_coef=1.0"],
}


def run(method: str, run_dir: Path, args: argparse.Namespace, extra: list[str]) -> None:
    group = [] if method == "opd" else [f"actor.samples_per_prompt={args.group}"]
    command = [sys.executable, "-m", "asyncopd.launch", *METHODS[method], *group,
               f"learner.num_steps={args.steps}", f"eval.every_steps={args.eval_every}",
               "run.wandb=disabled", "run.progress=false", "learner.export_hf=false",
               f"run.dir={run_dir}", f"run.name=opd_vs_grpo-{method}", "learner.resume=null", *extra]
    print("running:", " ".join(command[2:]), flush=True)
    log = run_dir.with_suffix(".log")
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"{method} run failed (exit {result.returncode}); see {log}")


def curve(run_dir: Path) -> list[tuple[int, int, float, float]]:
    """(policy version, training tokens generated so far, held-out accuracy, reverse KL) per eval."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    tokens_at: dict[int, int] = {0: 0}
    total = 0
    for r in sorted((r for r in records if "batch/samples" in r), key=lambda r: r["step"]):
        total += round(r["batch/samples"] * r["batch/response_tokens_mean"])
        tokens_at[r["step"]] = total
    evals = sorted((r for r in records if "eval/accuracy" in r), key=lambda r: r["step"])
    return [(r["step"], tokens_at[r["step"]], r["eval/accuracy"], r["eval/rkl"]) for r in evals]


def tokens_to_target(points: list[tuple[int, int, float, float]], target: float) -> tuple[int, bool]:
    """Tokens at the first eval at or above ``target``; else (all tokens, False)."""
    for _, tokens, accuracy, _ in points:
        if accuracy >= target:
            return tokens, True
    return points[-1][1], False


def teacher_accuracy(extra: list[str]) -> float:
    """The demo teacher's held-out greedy accuracy, from its cache manifest."""
    sys.path.insert(0, str(REPO))
    from asyncopd.config import TaskConfig
    from asyncopd.tasks.demo import demo_cache_dir, ensure_demo_models

    task = {o.split("=", 1)[0][len("task."):]: o.split("=", 1)[1] for o in extra if o.startswith("task.")}
    cfg = TaskConfig(**{k: v for k, v in task.items() if k == "cache_dir"})
    ensure_demo_models(cfg)
    return float(json.loads((demo_cache_dir(cfg) / "manifest.json").read_text())["teacher_eval_accuracy"])


def plot(curves: dict[str, list[tuple[int, int, float, float]]], target: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'); skipping curves.png")
        return
    fig, (acc_ax, rkl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method, points in curves.items():
        tokens = [p[1] for p in points]
        acc_ax.plot(tokens, [p[2] for p in points], marker="o", label=method)
        rkl_ax.plot(tokens, [p[3] for p in points], marker="o", label=method)
    acc_ax.axhline(target, color="gray", linestyle="--", label="target")
    acc_ax.set(xlabel="student tokens generated for training", ylabel="held-out greedy accuracy")
    rkl_ax.set(xlabel="student tokens generated for training", ylabel="reverse KL to teacher / token")
    for ax in (acc_ax, rkl_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"curves: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per method")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--group", type=int, default=8, help="GRPO samples per prompt")
    parser.add_argument("--target-frac", type=float, default=0.7, help="target = this x teacher accuracy")
    parser.add_argument("--teacher-accuracy", type=float, default=None,
                        help="the teacher's held-out accuracy (default: the demo teacher's, from its cache)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "opd_vs_grpo")
    parser.add_argument("--from-curves", type=Path, default=None,
                        help="re-analyse a previous run's curves.json instead of running the jobs")
    args, extra = parser.parse_known_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "opd" not in methods:
        parser.error(f"--methods must include opd and name only {sorted(METHODS)}; got {args.methods}")
    teacher = args.teacher_accuracy if args.teacher_accuracy is not None else teacher_accuracy(extra)
    target = args.target_frac * teacher
    if args.from_curves is not None:
        curves = {m: [tuple(p) for p in pts] for m, pts in json.loads(args.from_curves.read_text()).items()}
        methods = [m for m in methods if m in curves]
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        curves = {}
        for method in methods:
            run_dir = args.out / method
            run(method, run_dir, args, extra)
            curves[method] = curve(run_dir)
        (args.out / "curves.json").write_text(json.dumps(curves, indent=1))
        plot(curves, target, args.out / "curves.png")

    # The ratio depends on the target: show a few beside the chosen one.
    print("tokens to reach a fraction of the teacher's accuracy (- = not reached):")
    print("  frac  target  " + "  ".join(f"{m:>10s}" for m in methods))
    for frac in sorted({0.65, 0.7, 0.75, args.target_frac}):
        cells = []
        for m in methods:
            tokens, ok = tokens_to_target(curves[m], frac * teacher)
            cells.append(f"{tokens:>10,}" if ok else f"{'-':>10s}")
        print(f"  {frac:4.2f}  {frac * teacher:6.3f}  " + "  ".join(cells))
    print(f"target held-out accuracy {target:.3f} ({args.target_frac} x teacher)")
    reached = {}
    for method, points in curves.items():
        tokens, ok = tokens_to_target(points, target)
        reached[method] = (tokens, ok)
        final = points[-1]
        status = "reached" if ok else "NOT reached"
        print(f"{method:9s} {status} after {tokens:,} tokens; final accuracy {final[2]:.3f}, rkl {final[3]:.3f} "
              f"at step {final[0]}")
    opd_tokens, opd_ok = reached["opd"]
    rl = "grpo" if "grpo" in reached else methods[-1]
    rl_tokens, rl_ok = reached[rl]
    if not opd_ok:
        print("OPD did not reach the target: the ratio is not meaningful; raise --steps or lower --target-frac")
    elif not rl_ok:
        print(f"{rl} did not reach the target within {args.steps} steps: the ratio is a lower bound")
    print(f"opd_vs_grpo token_ratio {rl_tokens / max(opd_tokens, 1):.2f}")


if __name__ == "__main__":
    main()
