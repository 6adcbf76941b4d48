"""The whole job under torchrun with tiny random models: it completes, respects the
staleness bound, writes metrics (the eval measures and samples.jsonl at every
evaluation, the collapse verdict), a checkpoint and an HF export, and resumes."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from _jobs import run_tiny_job
from asyncopd.tasks.tiny import save_tiny_model

pytestmark = pytest.mark.integration


def run_job(run_dir: Path, models: tuple[str, str], *overrides: str, timeout: int = 420) -> subprocess.CompletedProcess:
    return run_tiny_job(run_dir, models, *overrides, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_run(run_dir: Path, *, eta: int, steps: int, batch: int, teacher_samples: bool = True) -> dict:
    """``teacher_samples``: whether the eval has the teacher's own samples (every job's
    teacher makes them unless eval.teacher_samples=false)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["policy_version"] == steps
    assert summary["samples_trained"] == steps * batch
    assert summary["samples_dropped_stale"] == 0
    assert summary["buffer/staleness_max"] <= eta
    assert summary["eval/accuracy_before"] is not None and summary["eval/rkl_after"] is not None
    records = read_metrics(run_dir)
    steps_logged = [r for r in records if "learner/loss" in r]
    start = summary["start_policy_version"]
    assert [r["step"] for r in steps_logged][-(steps - start):] == list(range(start + 1, steps + 1))
    for r in steps_logged:
        assert r["buffer/staleness_max"] <= eta
        for key in ("learner/rkl", "learner/is_clip_frac", "actor/tokens_per_s", "teacher/score_s",
                    "timing/step_s", "timing/weight_sync_s"):
            assert key in r, key
    evals = [r for r in records if "eval/rkl" in r]
    assert {start, steps} <= {r["step"] for r in evals}
    teacher_keys = ("eval/teacher_sample_nll", "eval/teacher_self_nll", "eval/teacher_distinct2",
                    "eval/teacher_eos_rate", "eval/teacher_response_tokens")
    for r in evals:  # the measures a collapse cannot fool, at every evaluation
        for key in ("eval/distinct2", "eval/repetition", "eval/eos_rate") + (teacher_keys if teacher_samples else ()):
            assert key in r, key
        assert r["eval/collapse"] in (0.0, 1.0)
        if teacher_samples:
            assert r["eval/teacher_sample_nll"] > 0
        else:
            assert not any(key in r for key in teacher_keys)
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {start, steps} <= {s["step"] for s in samples}
    assert all((s["teacher"] is not None) == teacher_samples for s in samples)
    assert summary["eval/verdict"] in ("ok", "collapse", "worse")
    assert (summary["eval/teacher_sample_nll_after"] or 0) > 0 if teacher_samples else \
        summary["eval/teacher_sample_nll_after"] is None
    assert (run_dir / "config.yaml").is_file()
    return summary


def test_synchronous_fixed_lag_job_with_two_learner_ranks(tmp_path, models) -> None:
    run_dir = tmp_path / "sync"
    result = run_job(run_dir, models, "async.max_staleness=0", "async.schedule=fixed_lag", "cluster.learners=2",
                     "loss.kl_loss=none")  # the seeds' OPD advantage, reachable by explicit setting
    assert result.returncode == 0
    summary = check_run(run_dir, eta=0, steps=4, batch=8)
    assert summary["objective"] == "1 x OPD advantage (loss.kl_loss=none loss.pg_coef=1 teacher.top_k=0)"
    assert (run_dir / "hf" / "config.json").is_file()


def test_off_by_one_job_checkpoints_exports_and_resumes(tmp_path, models) -> None:
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "async"
    result = run_job(run_dir, models, "async.max_staleness=1", "learner.checkpoint_every=2", "run.trace=true")
    assert result.returncode == 0
    summary = check_run(run_dir, eta=1, steps=4, batch=8)
    assert summary["objective"].endswith("(loss.kl_loss=topk loss.pg_coef=0 teacher.top_k=16)")  # the default
    assert "objective: 1 x reverse KL over teacher+student top-16" in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_4"]
    timeline = json.loads((run_dir / "trace.json").read_text())["traceEvents"]
    spans = {(e["pid"], e["name"]) for e in timeline if e["ph"] == "X"}
    rows = {e["pid"]: e["args"]["name"] for e in timeline if e["name"] == "process_name"}
    assert {(rows[pid], name) for pid, name in spans} >= {
        ("actor 0", "generate"), ("actor 0", "admit"), ("actor 0", "load_weights"), ("actor 0", "ship"),
        ("teacher 0", "score"), ("learner 0", "wait_batch"), ("learner 0", "train"),
        ("learner 0", "publish_weights"), ("learner 0", "checkpoint")}
    exported = AutoModelForCausalLM.from_pretrained(str(run_dir / "hf"))
    assert exported.config.vocab_size == 98

    resumed = run_job(run_dir, models, "async.max_staleness=1", "learner.resume=latest", "learner.num_steps=6")
    assert resumed.returncode == 0
    summary = check_run(run_dir, eta=1, steps=6, batch=8)
    assert summary["start_policy_version"] == 4
    assert (run_dir / "checkpoints" / "step_6").is_dir()


def test_kdrl_job_with_top_k_distillation_and_grpo_groups(tmp_path, models) -> None:
    """GRPO groups + the top-k reverse KL (teacher and student top-k over the wire) +
    2 mini-batches x 2 epochs, through the real roles."""
    run_dir = tmp_path / "kdrl"
    result = run_job(run_dir, models, "teacher.top_k=4", "loss.kl_loss=topk", "loss.kl_loss_coef=0.5",
                     "loss.advantage=grpo", "actor.samples_per_prompt=4", "learner.mini_batches=2",
                     "learner.ppo_epochs=2")
    assert result.returncode == 0
    check_run(run_dir, eta=1, steps=4, batch=8)
    steps = [r for r in read_metrics(run_dir) if "learner/loss" in r]
    for r in steps:
        assert r["learner/updates"] == 4
        assert 0.0 <= r["learner/topk_overlap"] <= 1.0
        assert r["learner/kl_loss"] >= 0.0  # a KL over a partition is never negative
        for key in ("learner/kl_k3", "learner/entropy", "learner/adv_std", "learner/is_mask_frac",
                    "learner/ppo_clip_frac"):
            assert key in r, key
        if r["batch/reward_mean"] in (0.0, 1.0):  # random tiny models: every group all-wrong
            assert r["learner/adv_std"] == 0.0 and r["learner/pg_loss"] == pytest.approx(0.0, abs=1e-6)


def test_colocated_teacher_job_trains_on_the_full_vocabulary_kl(tmp_path, models) -> None:
    """teacher.backend=colocated: no teacher ranks, the actor ships rollouts to learner
    rank 0, each of two learner ranks holds the teacher and trains on the exact reverse
    KL over the whole vocabulary (what loss.kl_loss=auto picks here); held-out evaluation
    is scored by the learner, and learner rank 0 samples the teacher's references."""
    run_dir = tmp_path / "colocated"
    result = run_job(run_dir, models, "teacher.backend=colocated", "cluster.teachers=0", "cluster.learners=2")
    assert result.returncode == 0
    summary = check_run(run_dir, eta=1, steps=4, batch=8)  # with the NLL of teacher samples
    assert summary["objective"] == ("1 x exact reverse KL over the full vocabulary "
                                    "(loss.kl_loss=full loss.pg_coef=0 teacher.top_k=0)")
    assert "learner 0: sampled 8 held-out references" in result.stderr
    assert math.isfinite(summary["eval/rkl_before"]) and math.isfinite(summary["eval/rkl_after"])
    for r in (r for r in read_metrics(run_dir) if "learner/loss" in r):
        assert r["learner/kl_loss"] > 0.0 and r["learner/loss"] == pytest.approx(r["learner/kl_loss"], rel=1e-5)
        assert math.isfinite(r["learner/rkl"]) and r["teacher/score_s"] == 0.0
        assert "teacher/rkl_behaviour" not in r  # scored inside the train step, not on arrival


def test_impossible_config_fails_before_any_process_starts(tmp_path, models) -> None:
    result = run_job(tmp_path / "bad", models, "async.max_staleness=-1", timeout=120)
    assert result.returncode == 2
    assert "async.max_staleness=-1" in result.stderr and "Fix" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_mismatched_tokenizers_are_a_startup_error(tmp_path, models) -> None:
    from transformers import AutoTokenizer

    other = tmp_path / "other_teacher"
    save_tiny_model(other, seed=5)
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(str(other))
    result = run_job(tmp_path / "mismatch", (models[0], str(other)), timeout=120)
    assert result.returncode == 2
    assert "tokenizers differ" in result.stderr


def test_a_staleness_sweep_runs_one_job_per_value_and_compares_them(tmp_path, models) -> None:
    base = tmp_path / "sweep"
    result = run_job(base, models, "-m", "async.max_staleness=0,1", "learner.num_steps=3", "eval.enabled=false")
    assert result.returncode == 0
    jobs = json.loads((base / "sweep.json").read_text())
    assert [j["job"] for j in jobs] == ["async.max_staleness=0", "async.max_staleness=1"]
    for eta, job in enumerate(jobs):
        assert job["returncode"] == 0 and Path(job["run_dir"]) == base / f"async.max_staleness={eta}"
        assert job["summary"]["async/max_staleness"] == eta and job["summary"]["buffer/staleness_max"] <= eta
        assert job["summary"]["policy_version"] == 3
    table = [line for line in result.stderr.splitlines() if "asyncopd.sweep" in line]
    assert any("async.max_staleness=1" in line and "(<= 1)" in line for line in table)
