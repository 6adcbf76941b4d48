"""One command that checks the GPU path end to end on one GPU.

    python bench/gpu_check.py [--steps 20] [--out /tmp/gpu_check] [extra overrides ...]

Runs the tiny demo job with every role on the GPU (``+device=gpu``: placement
shares the one GPU, the learner in bf16 with fp32 master weights, the actor's vLLM
engine with CUDA graphs, the teacher as an in-process vLLM engine, weights over
CUDA IPC), then prints what a user needs to know:

    gpu_check tokens_per_s <actor tokens/s> weight_sync_s <s/step> learner_step_s <train s/step> ...

read from the run's metrics.jsonl over the steps after the first (warm-up). It
exits 0 when the job finished and the student's reverse KL did not rise. Without
a GPU it says so and exits 2 (it never falls back to the CPU). Numbers are those of
this machine; nothing here is a pass/fail threshold on speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# The tiny demo models are short: keep lengths within their context, and each role's
# share of the GPU small (they are tiny; the rest stays free for the other roles).
TINY_GPU_OVERRIDES = [
    "+device=gpu", "actor.max_model_len=64", "actor.max_new_tokens=8", "actor.max_num_seqs=64",
    "actor.gpu_memory_utilization=0.2", "teacher.gpu_memory_utilization=0.2", "learner.gpu_memory_utilization=0.3",
    "learner.batch_size=64", "learner.micro_batch_tokens=8192", "learner.weight_sync_bucket_mb=32",
    "run.wandb=disabled", "run.progress=false",
]


def job_command(steps: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "asyncopd.launch", "--config-name", "tiny", *TINY_GPU_OVERRIDES,
            f"learner.num_steps={steps}", f"run.dir={run_dir}", *extra]


def summarize(run_dir: Path) -> dict[str, float]:
    """Means over the steps after the first, from metrics.jsonl, plus summary.json's evals."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "timing/train_s" in r]
    steady = steps[1:] or steps

    def mean(key: str) -> float:
        values = [r[key] for r in steady if isinstance(r.get(key), (int, float))]
        return statistics.fmean(values) if values else float("nan")

    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "tokens_per_s": mean("actor/tokens_per_s"),
        "weight_sync_s": mean("timing/weight_sync_s"),
        "actor_weight_load_s": mean("actor/weight_sync_s"),
        "learner_step_s": mean("timing/train_s"),
        "step_s": mean("timing/step_s"),
        "steps": float(len(steps)),
        "rkl_before": summary.get("eval/rkl_before") or float("nan"),
        "rkl_after": summary.get("eval/rkl_after") or float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("/tmp/asyncopd_gpu_check"))
    parser.add_argument("--timeout-s", type=float, default=540.0)
    args, extra = parser.parse_known_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; nothing to check (run it on a GPU machine)")
        return 2
    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}", flush=True)
    run_dir = args.out / time.strftime("%Y%m%d-%H%M%S")
    command = job_command(args.steps, run_dir, extra)
    print("gpu_check:", " ".join(command), flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, cwd=REPO_ROOT, timeout=args.timeout_s)
    wall = time.perf_counter() - start
    if code != 0:
        print(f"gpu_check: the job failed (exit {code}) after {wall:.0f} s; see its log above")
        return 1
    result = summarize(run_dir)
    result["wall_s"] = wall
    (run_dir / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print("gpu_check " + " ".join(f"{k} {v:.4g}" for k, v in result.items()))
    ok = not result["rkl_after"] > result["rkl_before"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
