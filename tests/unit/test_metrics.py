"""The metrics writer: JSONL lines and wandb (offline), including evaluations that
arrive after later steps were logged."""

from __future__ import annotations

import json
import time

from asyncopd.metrics import MetricsWriter


def test_late_evaluations_reach_wandb_and_the_jsonl(tmp_path) -> None:
    writer = MetricsWriter(tmp_path, config={"a": 1}, total_steps=3, initial_step=0, wandb_mode="offline",
                           progress=False, run_name="t")
    writer.log({"learner/loss": 1.0}, step=1)
    writer.log({"learner/loss": 0.5}, step=2)
    writer.log({"eval/accuracy": 0.7, "eval/policy_version": 1}, step=1)  # version 1, evaluated late
    writer.log_samples([{"prompt": "1+2=", "student": "-\n\n-", "teacher": "3"}], step=1)
    writer.close()
    (sample,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sample == {"step": 1, "prompt": "1+2=", "student": "-\n\n-", "teacher": "3"}
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "eval/accuracy" in r) for r in records] == [(1, False), (2, False), (1, True)]
    assert records[0]["time"] <= records[1]["time"] <= records[2]["time"]
    # wandb dropped a log(step=1) after step 2 as out of order; the records' own "step" is the x axis.
    (history,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 30  # wandb's service process may still be writing after finish()
    while b"eval/accuracy" not in history.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"learner/loss" in history.read_bytes(), _wandb_logs(tmp_path)
    assert b"eval/accuracy" in history.read_bytes(), _wandb_logs(tmp_path)
    deadline = time.monotonic() + 30
    while b"eval/samples" not in history.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"eval/samples" in history.read_bytes(), _wandb_logs(tmp_path)  # the table


def _wandb_logs(run_dir) -> str:
    return "\n".join(f"== {log}\n{log.read_text()[-2000:]}" for log in (run_dir / "wandb").glob("*/logs/*.log"))
