"""Does a long job's memory stay flat? A soak of the demo with RSS sampled per process.

Starts the demo job (``python -m asyncopd.launch``, default config unless overrides
say otherwise) with a step count it will not reach, samples the resident set size
(``VmRSS``) of every rank (learner, actor, teacher) every ``--every-s`` seconds for
``--minutes`` minutes, then ends the job. After a warm-up (``--warmup-min``: engine
start, first evaluation, allocator growth), it fits a straight line to each rank's
RSS and reports the slope, over everything after the warm-up and over the second
half of the run alone: a process that is still settling (allocator pools filling up
to their working size) rises early and levels off, so the second half shows the
trend, a leak rises in both. A rank "grows" when its second-half line rises by more
than ``--tolerance-mb`` (default 50 MB) per hour of running; the allocator's own
fluctuation on these processes is a few MB.

The samples go to ``--out`` (JSON lines: time, rank, role, rss_mb, and anon_mb: the
anonymous part of it, heap and allocator pools, from ``/proc/<pid>/smaps_rollup``). Last line:
``soak minutes M ranks R max_slope_mb_per_h X growing G`` (X: the largest second-half
slope; G = ranks that grow).

Usage: python bench/soak.py [--minutes 30] [--every-s 30] [--warmup-min 5] [--out soak.jsonl] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ROLES = {0: "learner", 1: "actor", 2: "teacher"}


def ranks_under(root: int) -> dict[int, int]:
    """rank -> pid of the torchrun workers among ``root``'s descendants (torchrun starts
    its workers in sessions of their own, so the process tree is the way to find them)."""
    parents: dict[int, int] = {}
    envs: dict[int, dict[str, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            envs[int(entry.name)] = dict(item.split("=", 1) for item in (entry / "environ").read_bytes()
                                         .decode(errors="replace").split("\0") if "=" in item)
        except (OSError, ValueError, IndexError):
            continue
    found: dict[int, int] = {}
    for pid, env in envs.items():
        ancestor = pid
        while ancestor in parents and ancestor != root:
            ancestor = parents[ancestor]
        if ancestor == root and "RANK" in env and "TORCHELASTIC_RUN_ID" in env:
            rank = int(env["RANK"])
            # vLLM or torch may fork helpers that inherit RANK: keep the rank's topmost process.
            if rank not in found or parents.get(pid) == root or pid < found[rank]:
                found[rank] = pid
    return found


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def anonymous_mb(pid: int) -> float | None:
    """Anonymous memory of ``pid`` (heap, allocator arenas, tensors), without the
    file-backed pages (libraries, mapped models) that RSS also counts."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slope_mb_per_h(times_s: list[float], values_mb: list[float]) -> float:
    if len(times_s) < 3:
        return float("nan")
    slope_per_s = np.polyfit(np.asarray(times_s), np.asarray(values_mb), 1)[0]
    return float(slope_per_s * 3600)


def slope_ci_mb_per_h(times_s: list[float], values_mb: list[float]) -> tuple[float, float]:
    """Least-squares slope (MB/h) and the half-width of its 95% interval, with a
    Newey-West (HAC, Bartlett kernel) standard error: RSS moves in steps and plateaus,
    so neighbouring residuals are correlated and the plain OLS interval would be too
    narrow. Lag: floor(4 (n/100)^(2/9)), at least 1."""
    t, y = np.asarray(times_s, dtype=float), np.asarray(values_mb, dtype=float)
    n = len(t)
    if n < 4:
        return float("nan"), float("nan")
    x = t - t.mean()
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    residual = y - y.mean() - slope * x
    score = x * residual
    lags = max(1, int(4 * (n / 100) ** (2 / 9)))
    s = float((score * score).sum())
    for lag in range(1, lags + 1):
        s += 2 * (1 - lag / (lags + 1)) * float((score[lag:] * score[:-lag]).sum())
    se = float(np.sqrt(max(s, 0.0)) / (x * x).sum())
    return slope * 3600, 1.96 * se * 3600


def end_job(job: subprocess.Popen) -> None:
    """End a job started in its own process group: SIGTERM, then SIGKILL after 60 s."""
    try:
        os.killpg(job.pid, signal.SIGTERM)
        job.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(job.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--every-s", type=float, default=30.0)
    parser.add_argument("--warmup-min", type=float, default=5.0)
    parser.add_argument("--tolerance-mb", type=float, default=50.0, help="allowed rise per hour")
    parser.add_argument("--out", type=Path, default=None)
    args, overrides = parser.parse_known_args()

    run_dir = Path(tempfile.mkdtemp(prefix="asyncopd-soak-"))
    out = args.out or run_dir / "soak.jsonl"
    command = [sys.executable, "-m", "asyncopd.launch", f"run.dir={run_dir}", "learner.num_steps=1000000",
               "learner.resume=null", "run.progress=false", "run.wandb=disabled", "run.name=soak",
               "learner.export_hf=false", *overrides]
    print("starting", " ".join(command), flush=True)
    log = (run_dir / "job.log").open("w")
    job = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    started = time.monotonic()
    samples: dict[int, list[tuple[float, float]]] = {}
    try:
        with out.open("w") as sink:
            while time.monotonic() - started < args.minutes * 60:
                if job.poll() is not None:
                    print(f"the job ended early (exit {job.returncode}); see {run_dir / 'job.log'}")
                    return 1
                now = time.monotonic() - started
                for rank, pid in sorted(ranks_under(job.pid).items()):
                    value = rss_mb(pid)
                    if value is None:
                        continue
                    samples.setdefault(rank, []).append((now, value))
                    anon = anonymous_mb(pid)
                    sink.write(json.dumps({"t_s": round(now, 1), "rank": rank, "role": ROLES.get(rank, "?"),
                                           "pid": pid, "rss_mb": round(value, 1),
                                           "anon_mb": None if anon is None else round(anon, 1)}) + "\n")
                sink.flush()
                time.sleep(args.every_s)
    finally:
        end_job(job)
    steps = sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"learner/loss"' in line) \
        if (run_dir / "metrics.jsonl").is_file() else 0
    print(f"{steps} steps trained in {args.minutes:g} min; samples in {out}")
    slopes = {}
    half_s = args.minutes * 60 / 2
    for rank, series in sorted(samples.items()):
        kept = [(t, v) for t, v in series if t >= args.warmup_min * 60]
        late = [(t, v) for t, v in series if t >= half_s]
        slope = slope_mb_per_h([t for t, _ in kept], [v for _, v in kept])
        slopes[rank] = slope_mb_per_h([t for t, _ in late], [v for _, v in late])
        _, ci = slope_ci_mb_per_h([t for t, _ in late], [v for _, v in late])
        values = [v for _, v in kept] or [float("nan")]
        print(f"rank {rank} ({ROLES.get(rank, '?')}): RSS at start {series[0][1]:.0f} MB, after warm-up "
              f"{values[0]:.0f} -> {values[-1]:.0f} MB (min {min(values):.0f}, max {max(values):.0f}), "
              f"fitted slope {slope:+.1f} MB/h after warm-up, {slopes[rank]:+.1f} +- {ci:.1f} MB/h over the second half "
              f"(95% interval, Newey-West)")
    growing = [r for r, s in slopes.items() if not np.isfinite(s) or s > args.tolerance_mb]
    max_slope = max(slopes.values()) if slopes else float("nan")
    print(f"soak minutes {args.minutes:g} ranks {len(slopes)} max_slope_mb_per_h {max_slope:.1f} "
          f"growing {len(growing)}")
    return 0 if slopes and not growing else 1


if __name__ == "__main__":
    sys.exit(main())
