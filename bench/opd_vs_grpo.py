"""How many student tokens does on-policy distillation save over RL?

Runs a job three times from the same student, on the same prompt stream, with
the same number of sampled responses per step (the same generation, scoring and
training compute per step):

- ``opd``:      on-policy distillation, one sample per prompt (``--opd-kl-loss``:
  ``none`` = the OPD advantage on sampled tokens, the objective of the OPD
  write-ups and of the recorded demo results; ``auto`` = the job's default
  objective, the top-16 reverse KL with teacher ranks);
- ``grpo``:     GRPO (group-normalised verifier reward), ``--group`` samples per prompt;
- ``grpo+opd``: GRPO with the OPD term as a per-token penalty (slime's
  ``--opd-kl-coef``), ``--group`` samples per prompt.

``--seeds N`` runs each N times (``run.seed=0..N-1``, seed-major so that a cut-short
study has whole seeds) into ``--out/method=<m>/seed=<k>/``. Each run evaluates
held-out greedy accuracy every ``--eval-every`` steps. For each method the script
reports the student tokens generated for training until the held-out accuracy first
reaches the target (``--target`` or ``--target-frac`` times the teacher's accuracy):
mean ± 95% t-interval over seeds (asyncopd/report/tokens.py). A run that never reaches
it counts as the tokens of its whole run, so such a mean is a lower bound (marked
``>=``, or ``>`` when no seed reached it). It writes ``tokens.md`` and ``tokens.json``,
``curves.png`` (accuracy and reverse KL against tokens, mean over seeds with bands),
``curves.json``, and the sweep report of ``python -m asyncopd.report`` (``report.md``:
final accuracy / reverse KL with intervals and differences against OPD).

The last line is ``opd_vs_grpo token_ratio <GRPO tokens / OPD tokens>`` (means over
seeds, at the target; a lower bound when GRPO did not reach it in some seed).

Usage: python bench/opd_vs_grpo.py [--config-name NAME] [--seeds N] [--steps N] [--out DIR]
       [extra hydra overrides...]   (plots need matplotlib: pip install -e '.[bench]').
The sparse-reward setting (student at ~5% held-out accuracy):
python bench/opd_vs_grpo.py --config-name opd_vs_grpo_sparse --seeds 3 --out runs/opd_vs_grpo_sparse
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from asyncopd.report.stats import mean_ci  # noqa: E402
from asyncopd.report.tokens import (  # noqa: E402
    CurvePoint,
    TokensSummary,
    read_token_curve,
    summarize_tokens,
    token_ratio,
)

METHODS: dict[str, list[str]] = {
    "opd": ["loss.advantage=opd", "actor.samples_per_prompt=1"],
    "grpo": ["loss.advantage=grpo", "loss.kl_loss=none"],
    "grpo+opd": ["loss.advantage=grpo", "loss.kl_loss=none", "loss.opd_penalty_coef=1.0"],
}
"""Per method; the OPD arm's loss.kl_loss comes from --opd-kl-loss, GRPO's group size from --group."""

Curves = dict[str, list[list[CurvePoint]]]
"""method -> one evaluation curve per seed."""


def method_overrides(method: str, args: argparse.Namespace) -> list[str]:
    if method == "opd":
        return [*METHODS["opd"], f"loss.kl_loss={args.opd_kl_loss}"]
    return [*METHODS[method], f"actor.samples_per_prompt={args.group}"]


def run(method: str, seed: int, run_dir: Path, args: argparse.Namespace, extra: list[str]) -> None:
    config = [f"--config-name={args.config_name}"] if args.config_name else []
    command = [sys.executable, "-m", "asyncopd.launch", *config, *method_overrides(method, args),
               f"learner.num_steps={args.steps}", f"eval.every_steps={args.eval_every}", f"run.seed={seed}",
               "run.wandb=disabled", "run.progress=false", "learner.export_hf=false",
               f"run.dir={_quoted(str(run_dir))}", f"run.name=opd_vs_grpo-{method}", "learner.resume=null", *extra]
    print("running:", " ".join(command[2:]), flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "job.log"
    with open(log, "w") as out:
        result = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"{method} seed {seed} failed (exit {result.returncode}); see {log}")


def _quoted(value: str) -> str:
    """``value`` as one hydra override value (run directories hold '=')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def teacher_accuracy(args: argparse.Namespace, extra: list[str]) -> float:
    """The built-in teacher's held-out greedy accuracy, from its cache manifest (built if needed)."""
    from asyncopd.launch import compose_config
    from asyncopd.tasks.demo import demo_cache_dir, ensure_demo_models

    config = [f"--config-name={args.config_name}"] if args.config_name else []
    task = compose_config([*config, *extra]).task
    ensure_demo_models(task)
    return float(json.loads((demo_cache_dir(task) / "manifest.json").read_text())["teacher_eval_accuracy"])


def load_curves(path: Path) -> Curves:
    """curves.json: {method: [curve per seed]}; the single-run format {method: curve} of earlier results too."""
    data = json.loads(path.read_text())
    out: Curves = {}
    for method, runs in data.items():
        if runs and isinstance(runs[0][0], (int, float)):  # one run: a list of points
            runs = [runs]
        out[method] = [[CurvePoint(int(p[0]), int(p[1]), float(p[2]), float(p[3])) for p in points] for points in runs]
    return out


def finished_runs(out: Path, methods: list[str]) -> Curves:
    """The curves of every finished run (one with summary.json) under ``out/method=<m>/seed=<k>/``."""
    curves: Curves = {}
    for method in methods:
        dirs = sorted((out / f"method={method}").glob("seed=*"), key=lambda d: int(d.name.split("=", 1)[1]))
        curves[method] = [read_token_curve(d) for d in dirs if (d / "summary.json").is_file()]
    return curves


def write_curves(out: Path, curves: Curves) -> None:
    (out / "curves.json").write_text(json.dumps(
        {m: [[[p.policy_version, p.tokens, p.accuracy, p.rkl] for p in r] for r in runs] for m, runs in curves.items()}))


def report_runs(out: Path, methods: list[str]) -> None:
    """The sweep report of the runs under ``out`` (python -m asyncopd.report), against OPD."""
    from asyncopd.report import write_report

    report = write_report(out, baseline="method=opd" if "opd" in methods else None)
    print("\n".join(report.console_lines()))


def plot(curves: Curves, target: float, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'); skipping curves.png")
        return
    fig, (acc_ax, rkl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in curves.items():
        if not runs:
            continue
        length = min(len(r) for r in runs)  # evaluations all seeds have
        tokens = [sum(r[i].tokens for r in runs) / len(runs) for i in range(length)]
        for ax, field in ((acc_ax, "accuracy"), (rkl_ax, "rkl")):
            cis = [mean_ci([getattr(r[i], field) for r in runs]) for i in range(length)]
            mean = [c.mean for c in cis]
            (line,) = ax.plot(tokens, mean, marker="o", markersize=3, label=f"{method} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(tokens, [c.low for c in cis], [c.high for c in cis], color=line.get_color(), alpha=0.2)
    acc_ax.axhline(target, color="gray", linestyle="--", label="target")
    acc_ax.set(xlabel="student tokens generated for training", ylabel="held-out greedy accuracy")
    rkl_ax.set(xlabel="student tokens generated for training", ylabel="reverse KL to teacher / token", yscale="log")
    for ax in (acc_ax, rkl_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("mean over seeds, 95% t-band")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"curves: {path}")


def tokens_table(curves: Curves, methods: list[str], targets: list[float]) -> list[str]:
    """Markdown rows: tokens to each target per method, mean ± 95% t-interval over seeds."""
    rows = ["| target accuracy | " + " | ".join(methods) + " | GRPO / OPD (ratio of means; 95% CI of the "
            "geometric-mean ratio) |", "|---|" + "---|" * (len(methods) + 1)]
    for target in targets:
        summaries = {m: summarize_tokens(curves[m], target) for m in methods}
        ratio = "-"
        if "grpo" in summaries and "opd" in summaries:
            r, low, high = token_ratio(summaries["grpo"], summaries["opd"])
            if summaries["grpo"].censored:  # an interval of lower bounds says little: the bound alone
                ratio = f">= {r:.2f} (GRPO censored)"
            else:
                ratio = f"{r:.2f}" + ("" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]")
            if summaries["opd"].censored:
                ratio += " (OPD censored: not meaningful)"
        rows.append(f"| {target:.3f} | " + " | ".join(summaries[m].text() for m in methods) + f" | {ratio} |")
    return rows


def write_tokens(out: Path, curves: Curves, methods: list[str], target: float, targets: list[float],
                 command: str) -> dict[str, TokensSummary]:
    summaries = {m: summarize_tokens(curves[m], target) for m in methods}
    budget = {m: [r[-1].tokens for r in curves[m]] for m in methods}
    lines = ["# Student tokens to a target held-out accuracy", "", f"`{command}`", "",
             "Tokens generated by the student for training until the first evaluation at or above the target; "
             "mean ± half-width of the 95% Student-t interval over seeds, (reached/seeds). A seed that never "
             "reached it counts with its whole run (`>=`: a lower bound; `>`: no seed reached it).", "",
             *tokens_table(curves, methods, targets), "",
             "| method | start accuracy | best accuracy (any evaluation) | final accuracy | final reverse KL "
             "| tokens in a whole run |", "|---|---|---|---|---|---|"]
    for m in methods:
        final_acc = mean_ci([r[-1].accuracy for r in curves[m]])
        final_rkl = mean_ci([r[-1].rkl for r in curves[m]])
        best_acc = mean_ci([max(p.accuracy for p in r) for r in curves[m]])
        lines.append(f"| {m} | {curves[m][0][0].accuracy:.3f} | {_ci(best_acc, 3)} | {_ci(final_acc, 3)} | "
                     f"{_ci(final_rkl, 2)} | "
                     f"{sum(budget[m]) / len(budget[m]):,.0f} |")
    (out / "tokens.md").write_text("\n".join(lines) + "\n")
    (out / "tokens.json").write_text(json.dumps(
        {"target": target, "methods": {m: {"tokens": list(s.values), "reached": list(s.reached),
                                           "mean": s.ci.mean, "half_width": _none(s.ci.half_width)}
                                       for m, s in summaries.items()}}, indent=1))
    return summaries


def _ci(m, digits: int) -> str:
    return f"{m.mean:.{digits}f}" + ("" if math.isnan(m.half_width) else f" ± {m.half_width:.{digits}f}")


def _none(value: float) -> float | None:
    return None if math.isnan(value) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", default=None, help="configs/<NAME>.yaml for every run (default: default)")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per run")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=1, help="replicates per method (run.seed=0..N-1)")
    parser.add_argument("--first-seed", type=int, default=0, help="start the replicates at this run.seed")
    parser.add_argument("--group", type=int, default=8, help="GRPO samples per prompt")
    parser.add_argument("--opd-kl-loss", default="none", choices=["none", "auto", "topk"],
                        help="loss.kl_loss of the OPD arm (none: the OPD advantage on sampled tokens)")
    parser.add_argument("--target", type=float, default=None, help="target held-out accuracy (absolute)")
    parser.add_argument("--target-frac", type=float, default=0.7, help="else target = this x teacher accuracy")
    parser.add_argument("--targets", default=None,
                        help="comma-separated targets of the tokens table (default: 0.5, 0.75 and 1 x the target)")
    parser.add_argument("--teacher-accuracy", type=float, default=None,
                        help="the teacher's held-out accuracy (default: the built-in teacher's, from its cache)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "opd_vs_grpo")
    parser.add_argument("--from-curves", type=Path, default=None,
                        help="re-analyse a previous study's curves.json instead of running the jobs")
    parser.add_argument("--from-runs", action="store_true",
                        help="re-analyse the finished runs under --out (method=*/seed=*/) instead of running jobs")
    args, extra = parser.parse_known_args()
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        parser.error(f"--methods must name some of {sorted(METHODS)}; got {args.methods}")
    if args.target is not None:
        target, teacher = args.target, args.teacher_accuracy
    else:
        teacher = args.teacher_accuracy if args.teacher_accuracy is not None else teacher_accuracy(args, extra)
        target = args.target_frac * teacher
    command = "python bench/opd_vs_grpo.py " + " ".join(sys.argv[1:])
    if args.from_curves is not None:
        curves = load_curves(args.from_curves)
        methods = [m for m in methods if curves.get(m)]
        args.out.mkdir(parents=True, exist_ok=True)
    elif args.from_runs:
        curves = finished_runs(args.out, methods)
        methods = [m for m in methods if curves.get(m)]
        curves = {m: curves[m] for m in methods}
        write_curves(args.out, curves)
        report_runs(args.out, methods)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        curves = {m: [] for m in methods}
        for seed in range(args.first_seed, args.first_seed + args.seeds):  # seed-major: a cut study has whole seeds
            for method in methods:
                run_dir = args.out / f"method={method}" / f"seed={seed}"
                run(method, seed, run_dir, args, extra)
                curves[method].append(read_token_curve(run_dir))
                write_curves(args.out, curves)
        report_runs(args.out, methods)
    plot(curves, target, args.out / "curves.png")

    # The ratio depends on the target: show a few beside the chosen one.
    fracs = (0.5, 0.75, 1.0)
    targets = sorted({round(f * target, 6) for f in fracs} if args.targets is None
                     else {float(t) for t in args.targets.split(",")} | {target})
    if teacher is not None:
        print(f"teacher held-out accuracy {teacher:.3f}")
    summaries = write_tokens(args.out, curves, methods, target, targets, command)
    print("\n".join(tokens_table(curves, methods, targets)))
    print(f"target held-out accuracy {target:.3f}; tokens: {args.out / 'tokens.md'}")
    if "opd" not in summaries or len(summaries) < 2:
        print("opd_vs_grpo token_ratio nan  (needs opd and an RL arm)")
        return
    opd, rl = summaries["opd"], summaries["grpo" if "grpo" in summaries else methods[-1]]
    if opd.censored:
        print("OPD did not reach the target in every seed: the ratio is not meaningful; raise --steps or lower the target")
    elif rl.censored:
        print(f"GRPO did not reach the target in {len(rl.values) - rl.num_reached} of {len(rl.values)} seeds "
              "within its run (counted as its whole run's tokens): the ratio is a lower bound")
    ratio, low, high = token_ratio(rl, opd)
    if not math.isnan(low) and not rl.censored and not opd.censored:
        print(f"geometric-mean ratio 95% interval [{low:.2f}, {high:.2f}]")
    print(f"opd_vs_grpo token_ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
