"""CPU seconds per training step, per role, of a running job (the per-step overhead study).

Starts ``python -m asyncopd.launch`` with the given overrides, reads each rank's CPU
time (all threads, ``/proc/<pid>/stat``) when the learner logs step ``--from-step``
and again at ``--to-step``, and prints core-seconds per step for every role, their
sum, and the learner's mean ``timing/step_s`` over the same steps. Start-up and
shutdown are outside the window, which is what a comparison with a single-process
trainer's steady state needs. Run it under ``/work/bin/exclusive`` for wall times;
CPU seconds are also meaningful on a busy machine (less so than on an idle one).

    python bench/step_cpu.py loss.kl_loss=topk teacher.top_k=16 loss.pg_coef=0 learner.batch_size=128
    python bench/step_cpu.py --config-name colocated learner.batch_size=128

Last line: ``step_cpu total <core-s/step> s_per_step <s>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from soak import end_job, ranks_under  # noqa: E402  (bench/ is not a package)

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float | None:
    """utime + stime of every thread of ``pid``, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


def learner_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]  # the last may be half-written
    return [r for r in map(json.loads, lines) if "timing/step_s" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-name", default="default")
    parser.add_argument("--from-step", type=int, default=15)
    parser.add_argument("--to-step", type=int, default=65)
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args, overrides = parser.parse_known_args()

    run_dir = Path(tempfile.mkdtemp(prefix="asyncopd-stepcpu-"))
    steps = args.to_step + 5
    command = [sys.executable, "-m", "asyncopd.launch", "--config-name", args.config_name, f"run.dir={run_dir}",
               f"learner.num_steps={steps}", "eval.enabled=false", "learner.export_hf=false",
               "learner.checkpoint_every_s=null", "run.progress=false", "run.wandb=disabled", *overrides]
    print("running:", " ".join(command[2:]), flush=True)
    from asyncopd.launch import compose_config

    cluster = compose_config(["--config-name", args.config_name, *overrides]).cluster
    log = (run_dir / "job.log").open("w")
    job = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    marks: dict[int, dict[int, float]] = {}
    started = time.monotonic()
    try:
        while len(marks) < 2:
            if job.poll() is not None:
                print(f"the job ended before step {args.to_step} (exit {job.returncode}); see {run_dir / 'job.log'}")
                return 1
            if time.monotonic() - started > args.timeout_s:
                print(f"step {args.to_step} not reached within {args.timeout_s:.0f} s; see {run_dir / 'job.log'}")
                return 1
            done = len(learner_steps(run_dir))
            for mark in (args.from_step, args.to_step):
                if mark not in marks and done >= mark:
                    marks[mark] = {rank: cpu_s(pid) or 0.0 for rank, pid in ranks_under(job.pid).items()}
            time.sleep(0.05)
    finally:
        end_job(job)
    span = args.to_step - args.from_step
    records = learner_steps(run_dir)[args.from_step:args.to_step]
    total = 0.0
    for rank in sorted(marks[args.to_step]):
        role, index = cluster.role_of(rank)
        per_step = (marks[args.to_step][rank] - marks[args.from_step].get(rank, 0.0)) / span
        total += per_step
        print(f"   {role} {index}: {per_step:.3f} core-s/step")
    s_per_step = sum(r["timing/step_s"] for r in records) / len(records)
    print(f"   steps {args.from_step}-{args.to_step}: learner {s_per_step:.3f} s/step "
          f"(train {sum(r['timing/train_s'] for r in records) / len(records):.3f}, "
          f"wait {sum(r['timing/wait_s'] for r in records) / len(records):.3f}, "
          f"weight sync {sum(r['timing/weight_sync_s'] for r in records) / len(records):.3f})")
    print(f"step_cpu total {total:.3f} s_per_step {s_per_step:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
