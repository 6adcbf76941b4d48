"""Helpers for the integration tests that run the whole job: the tiny model pair and
one ``python -m asyncopd.launch --config-name tiny`` run in its own process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from asyncopd.tasks.tiny import save_tiny_model

REPO = Path(__file__).resolve().parents[2]


def save_tiny_pair(root: Path) -> tuple[str, str]:
    """(student, teacher) directories: random 1- and 2-layer models with the same tokenizer."""
    student = save_tiny_model(root / "student", seed=1, hidden_size=64, num_layers=1)
    teacher = save_tiny_model(root / "teacher", seed=2, hidden_size=64, num_layers=2)
    return str(student), str(teacher)


def run_tiny_job(run_dir: Path, models: tuple[str, str], *overrides: str, timeout: int) -> subprocess.CompletedProcess:
    """Run the tiny job on ``models`` (student, teacher); fail the test if it outlives ``timeout`` seconds.
    Its output tails are printed when it fails."""
    student, teacher = models
    command = [sys.executable, "-m", "asyncopd.launch", "--config-name", "tiny",
               f"model.student.path={student}", f"model.teacher.path={teacher}", f"run.dir={run_dir}", *overrides]
    # Its own process group, so a hung job is ended with all of torchrun's ranks.
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        print(stdout[-5000:], stderr[-15000:], sep="\n")
        pytest.fail(f"the job did not finish within {timeout}s")
    if process.returncode != 0:
        print(stdout[-5000:], stderr[-15000:], sep="\n")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
