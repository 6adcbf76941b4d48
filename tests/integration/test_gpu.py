"""GPU checks (marked ``gpu``; skipped without a CUDA device): bench/gpu_check.py's tiny
job with every role on one GPU, and bf16 FSDP2 learner steps on CUDA."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO_ROOT = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO_ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_job_runs_with_every_role_on_one_gpu(tmp_path: Path) -> None:
    import subprocess

    check = _gpu_check()
    run_dir = tmp_path / "run"
    subprocess.run(check.job_command(6, run_dir, []), cwd=REPO_ROOT, check=True, timeout=540)
    result = check.summarize(run_dir)
    assert result["steps"] == 6
    assert result["tokens_per_s"] > 0 and math.isfinite(result["weight_sync_s"])
    assert result["learner_step_s"] > 0
