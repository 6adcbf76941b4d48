"""A job under real torchrun --max-restarts=1 loses its teacher (SIGKILL) mid-run:
the world restarts, the learner resumes from its last checkpoint (learner.resume=auto,
the default), and the run ends as if nothing happened: one metrics line per step,
every step trained with a full batch, the summary's "before" from the first attempt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asyncopd.tasks.tiny import save_tiny_model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS, BATCH = 40, 8


def _ranks(parent: int) -> dict[int, tuple[int, int]]:
    """rank -> (pid, restart attempt) of torchrun's workers."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(i.split("=", 1) for i in (entry / "environ").read_bytes().decode().split("\0") if "=" in i)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = (int(entry.name), int(env.get("TORCHELASTIC_RESTART_COUNT", "0")))
    return found


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def test_a_killed_teacher_costs_one_restart_and_nothing_else(tmp_path) -> None:
    student = save_tiny_model(tmp_path / "student", seed=1, hidden_size=64, num_layers=1)
    teacher = save_tiny_model(tmp_path / "teacher", seed=2, hidden_size=64, num_layers=2)
    run_dir = tmp_path / "run"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    command = [torchrun, "--standalone", "--nproc-per-node=3", "--max-restarts=1", "-m", "asyncopd.launch",
               "--config-name", "tiny", f"model.student.path={student}", f"model.teacher.path={teacher}",
               f"run.dir={run_dir}", f"learner.num_steps={STEPS}", "learner.checkpoint_every=5",
               "learner.export_hf=false"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        killed = None
        while killed is None and process.poll() is None and time.monotonic() < deadline:
            steps = [r for r in _records(run_dir) if "learner/loss" in r]
            evaluated = any("eval/accuracy" in r for r in _records(run_dir))
            if len(steps) >= 7 and evaluated:  # past the step-5 checkpoint and the "before" evaluation
                pid, attempt = _ranks(process.pid)[2]
                os.kill(pid, signal.SIGKILL)
                killed = len(steps)
            time.sleep(0.1)
        assert killed is not None and killed < STEPS, "the job ended before the kill"
        output, _ = process.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"the restarted job did not finish:\n{output[-8000:]}")
    assert process.returncode == 0, output[-8000:]

    records = _records(run_dir)
    steps = [r["step"] for r in records if "learner/loss" in r]
    assert steps == list(range(1, STEPS + 1))  # one line per step: those after the checkpoint were superseded
    assert all(r["batch/samples"] == BATCH for r in records if "learner/loss" in r)
    superseded = [json.loads(line) for line in (run_dir / "metrics.superseded.jsonl").read_text().splitlines()]
    assert superseded and all(r["superseded_by_attempt"] == 1 and r["step"] > 5 for r in superseded)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["num_resumes"] == 1 and summary["resumed_from"].endswith(f"step_{summary['start_policy_version']}")
    assert summary["samples_trained"] == STEPS * BATCH and summary["policy_version"] == STEPS
    assert summary["run_start_policy_version"] == 0
    first_eval = next(r for r in records if r.get("eval/policy_version") == 0)
    assert summary["eval/accuracy_before"] == first_eval["eval/accuracy"]  # the true start, from attempt 0
    assert summary["eval/rkl_after"] is not None
    assert summary["samples_regenerated"] >= (killed - summary["start_policy_version"]) * BATCH
