"""Does a job survive being killed, and lose nothing?

Runs one ``fixed_lag`` job (eta = 1, fixed seeds, tiny random models) twice under
``torchrun --max-restarts=K`` with ``learner.resume=auto``: once uninterrupted,
once killed K times (SIGKILL) at random moments in random roles (learner, actor,
teacher). Each kill waits until the current attempt has trained at least one
step, then a random 0..--max-delay-s more. Afterwards it compares:

- recovered R: kills after which a later attempt trained again (or finished);
- duplicate_steps D: steps with more than one line in ``metrics.jsonl``;
- lost_samples S: ``num_steps * batch_size`` minus the samples trained, plus any
  step that trained other than ``batch_size`` samples (regenerated samples, in
  ``summary.json`` ``samples_regenerated``, are not lost);
- final_match: max |delta| between the two runs' final weights (``hf/``).

The last line is
``chaos kills K recovered R duplicate_steps D lost_samples S final_match <max |delta|>``.
With ``--clean-twice`` a second uninterrupted run gives the noise floor of
final_match on this machine (two runs without faults).

Bit for bit. The CPU path is deterministic except for one thing: the teacher
scores whatever rollouts have queued up as one padded batch, and its log-probs
change in the last bit (~5e-7) with the padded length, i.e. with timing. By default
the job here scores each rollout alone (``teacher.max_batch_tokens=1``) and the actor
uses oneDNN's batch-independent GEMM (``actor.cpu_gemm=packed``; with the default
``plain`` a log-prob moves ~1e-6 with the engine batch, which a restart changes), so both
runs are functions of their seeds and final_match is 0 when resume is exact;
``--batched-teacher`` keeps the teacher's batching, and then final_match is within
the clean-vs-clean noise floor (measure it with ``--clean-twice``).

Usage: python bench/chaos.py [--kills 3] [--steps 120] [--seed 0] [--clean-twice] [--batched-teacher]
                            [extra overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROLES = ("learner", "actor", "teacher")


def job_command(run_dir: Path, models: tuple[str, str], steps: int, restarts: int, extra: list[str]) -> list[str]:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    return [torchrun, "--standalone", "--nproc-per-node=3", f"--max-restarts={restarts}", "-m", "asyncopd.launch",
            "--config-name", "tiny", f"model.student.path={models[0]}", f"model.teacher.path={models[1]}",
            f"run.dir={run_dir}", f"learner.num_steps={steps}", "async.schedule=fixed_lag", "async.max_staleness=1",
            "learner.checkpoint_every=10", "eval.enabled=false", "learner.export_hf=true", *extra]


def rank_pids(root_pid: int) -> dict[int, tuple[int, int]]:
    """rank -> (pid, restart attempt) of torchrun's live worker processes."""
    found: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != root_pid:
                continue
            env = dict(item.split("=", 1) for item in (entry / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = (int(entry.name), int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))
    return found


def step_lines(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return [r for r in records if "learner/loss" in r]


def run_job(run_dir: Path, command: list[str], kills: int, rng: random.Random, max_delay_s: float,
            timeout_s: float, log: Path) -> tuple[int, list[dict]]:
    """Run the job, killing a random role ``kills`` times; (exit code, kill records)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
        records: list[dict] = []
        deadline = time.monotonic() + timeout_s
        try:
            for k in range(kills):
                attempt = k  # each kill costs one restart
                baseline = None
                while process.poll() is None and time.monotonic() < deadline:
                    ranks = rank_pids(process.pid)
                    steps = len(step_lines(run_dir))
                    if ranks and all(a == attempt for _, a in ranks.values()) and len(ranks) == 3:
                        baseline = steps if baseline is None else baseline
                        if steps > baseline:  # this attempt trains
                            break
                    time.sleep(0.2)
                if process.poll() is not None or time.monotonic() >= deadline:
                    break
                time.sleep(rng.uniform(0.0, max_delay_s))
                role_rank = rng.randrange(3)
                ranks = rank_pids(process.pid)
                if role_rank not in ranks:
                    break
                pid, attempt = ranks[role_rank]
                steps_before = len(step_lines(run_dir))
                os.kill(pid, signal.SIGKILL)
                records.append({"role": ROLES[role_rank], "rank": role_rank, "pid": pid, "attempt": attempt,
                                "step_lines_at_kill": steps_before, "time": time.time()})
                print(f"chaos: kill {k + 1}: SIGKILL {ROLES[role_rank]} (rank {role_rank}, pid {pid}) in attempt "
                      f"{attempt}, after {steps_before} step lines", flush=True)
            code = process.wait(timeout=max(deadline - time.monotonic(), 1.0))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = -1
    return code, records


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted((run_dir / "hf").glob("*.safetensors"))
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def max_delta(a: dict, b: dict) -> float:
    if not a or a.keys() != b.keys():
        return float("nan")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def analyse(run_dir: Path, steps: int, batch: int) -> dict:
    lines = step_lines(run_dir)
    counts: dict[int, int] = {}
    for r in lines:
        counts[r["step"]] = counts.get(r["step"], 0) + 1
    duplicates = sum(c - 1 for c in counts.values())
    missing = [s for s in range(1, steps + 1) if s not in counts]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    trained = summary.get("samples_trained", 0)
    wrong_size = [r["step"] for r in lines if r.get("batch/samples") != batch]
    return {"duplicates": duplicates, "missing_steps": missing, "samples_trained": trained,
            "lost_samples": max(steps * batch - trained, 0) + sum(abs(r.get("batch/samples", 0) - batch)
                                                                   for r in lines if r["step"] in wrong_size),
            "wrong_size_steps": wrong_size, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule (moments, roles)")
    parser.add_argument("--max-delay-s", type=float, default=4.0)
    parser.add_argument("--timeout-s", type=float, default=1500.0)
    parser.add_argument("--clean-twice", action="store_true", help="also a second clean run (noise floor)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories under this path")
    parser.add_argument("--batched-teacher", action="store_true",
                        help="let the teacher batch rollouts as they queue up (not bit-reproducible)")
    args, extra = parser.parse_known_args()
    if not args.batched_teacher:
        # Also the actor: with actor.cpu_gemm=plain (the default) a request's log-probs move
        # in the last bit with the engine batch it shares, which a restart changes.
        extra = ["teacher.max_batch_tokens=1", "actor.cpu_gemm=packed", *extra]
    from asyncopd.tasks.tiny import save_tiny_model

    root = Path(args.keep or tempfile.mkdtemp(prefix="asyncopd-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    models = (str(save_tiny_model(root / "student", seed=1, hidden_size=64, num_layers=1)),
              str(save_tiny_model(root / "teacher", seed=2, hidden_size=64, num_layers=2)))
    batch = 8  # configs/tiny.yaml
    rng = random.Random(args.seed)
    results = {}
    names = ["clean", "chaos"] + (["clean2"] if args.clean_twice else [])
    for name in names:
        run_dir = root / name
        kills = args.kills if name == "chaos" else 0
        command = job_command(run_dir, models, args.steps, args.kills, extra)
        start = time.monotonic()
        code, records = run_job(run_dir, command, kills, rng, args.max_delay_s, args.timeout_s, root / f"{name}.log")
        wall = time.monotonic() - start
        result = analyse(run_dir, args.steps, batch)
        result.update(code=code, kills=records, wall_s=wall)
        results[name] = result
        summary = result["summary"]
        print(f"chaos: {name}: exit {code}, wall {wall:.0f}s (contended), step lines "
              f"{args.steps - len(result['missing_steps'])}/{args.steps}, duplicates {result['duplicates']}, "
              f"samples trained {result['samples_trained']}, regenerated {summary.get('samples_regenerated')}, "
              f"resumes {summary.get('num_resumes')}", flush=True)
    chaos = results["chaos"]
    weights = {name: final_weights(root / name) if (root / name / "hf").is_dir() else {} for name in names}
    delta = max_delta(weights["clean"], weights["chaos"])
    if args.clean_twice:
        print(f"chaos: clean vs clean2 final weights max |delta| {max_delta(weights['clean'], weights['clean2']):.3g}")
    # A kill is recovered when a later attempt trained again or the job finished.
    # (The next kill waits until a later attempt trained, so every kill but the last
    # is recovered once it happened; the last one when the job then finished.)
    kills = chaos["kills"]
    recovered = sum(1 for i, _ in enumerate(kills) if i < len(kills) - 1 or chaos["code"] == 0)
    (root / "chaos.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"chaos: run directories and logs under {root}")
    print(f"chaos kills {len(chaos['kills'])} recovered {recovered} duplicate_steps {chaos['duplicates']} "
          f"lost_samples {chaos['lost_samples']} final_match {delta:.3g}")
    return 0 if chaos["code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
