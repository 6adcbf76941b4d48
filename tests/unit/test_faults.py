"""Fault tolerance pieces without processes: the run-directory lock, preflight
errors, metrics superseded on resume, the buffer's checkpoint snapshot and
surplus cap, resume resolution and failure attribution."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from asyncopd.buffer import StalenessBuffer
from asyncopd.config import ConfigError, JobConfig, LearnerConfig, ModelConfig, ModelSpec, RunConfig, TaskConfig
from asyncopd.failures import RankStatus, describe_failure
from asyncopd.learner.resume import check_compatible, job_shape, resolve_checkpoint, set_aside_checkpoints
from asyncopd.metrics import SUPERSEDED_FILE, supersede_metrics
from asyncopd.preflight import check_data_files, check_model_dirs, check_run_dir
from asyncopd.rundir import RunDirBusy, acquire_run_dir, probe_run_dir


# ---- the run-directory lock ---------------------------------------------------------------------------
_HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from asyncopd.rundir import acquire_run_dir
    acquire_run_dir(Path(sys.argv[1]), job_id=sys.argv[2], attempt=0)
    print("held", flush=True)
    time.sleep(60)
""")


def _holder(run_dir: Path, job: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), job], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[2])
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_job_on_a_locked_run_dir_fails_naming_the_fix_and_the_lock_dies_with_its_holder(tmp_path) -> None:
    holder = _holder(tmp_path, "job-a")
    try:
        busy = r"in use by another job \(pid \d+ .*job job-a.*run\.name.*learner\.resume"
        with pytest.raises(RunDirBusy, match=busy):
            acquire_run_dir(tmp_path, job_id="job-b", attempt=0)
        with pytest.raises(RunDirBusy, match="in use by another job"):
            probe_run_dir(tmp_path)
    finally:
        holder.kill()  # SIGKILL: no cleanup code runs, the kernel drops the lock
        holder.wait()
    probe_run_dir(tmp_path)
    lock = acquire_run_dir(tmp_path, job_id="job-b", attempt=0)
    assert json.loads((tmp_path / ".asyncopd.lock").read_text())["job"] == "job-b"
    lock.release()


def test_a_restart_attempt_of_the_same_job_waits_for_the_dying_one(tmp_path) -> None:
    holder = _holder(tmp_path, "job-a")
    try:
        with pytest.raises(RunDirBusy):  # it waits same_job_wait_s, then gives up
            acquire_run_dir(tmp_path, job_id="job-a", attempt=1, same_job_wait_s=0.5)
    finally:
        holder.kill()
        holder.wait()
    acquire_run_dir(tmp_path, job_id="job-a", attempt=1, same_job_wait_s=0.5).release()


# ---- preflight --------------------------------------------------------------------------------------
def test_a_bad_jsonl_line_is_named_by_file_and_line(tmp_path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": \n')
    cfg = JobConfig(task=TaskConfig(train_path=str(data)))
    with pytest.raises(ConfigError, match=rf"task.train_path=.*{data}:2"):
        check_data_files(cfg)


def test_a_missing_model_directory_is_named_as_such(tmp_path) -> None:
    cfg = JobConfig(model=ModelConfig(teacher=ModelSpec(path=str(tmp_path / "nope"))))
    with pytest.raises(ConfigError, match=r"model.teacher.path=.*nope.*no such directory"):
        check_model_dirs(cfg)
    (tmp_path / "empty").mkdir()
    cfg = JobConfig(model=ModelConfig(student=ModelSpec(path=str(tmp_path / "empty"))))
    with pytest.raises(ConfigError, match=r"model.student.path=.*no config.json"):
        check_model_dirs(cfg)
    check_model_dirs(JobConfig(model=ModelConfig(student=ModelSpec(path="HuggingFaceTB/SmolLM2-135M"))))  # a hub id


def test_an_unwritable_or_full_run_dir_is_refused(tmp_path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not __import__("os").access(locked, __import__("os").W_OK):  # root ignores modes
            with pytest.raises(ConfigError, match="not writable"):
                check_run_dir(locked / "run", need_bytes=1)
    finally:
        locked.chmod(0o700)
    with pytest.raises(ConfigError, match=r"MiB free.*needs about"):
        check_run_dir(tmp_path / "run", need_bytes=2**62)
    check_run_dir(tmp_path / "a" / "b", need_bytes=1)


# ---- metrics across a restart -----------------------------------------------------------------------
def test_records_after_the_checkpoint_are_superseded(tmp_path) -> None:
    lines = [{"step": s, "learner/loss": 1.0, "batch/samples": 8} for s in range(1, 7)]
    lines.insert(1, {"step": 0, "eval/policy_version": 0, "eval/accuracy": 0.375})
    lines.append({"step": 5, "eval/policy_version": 5, "eval/accuracy": 0.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "tor')
    kept, superseded = supersede_metrics(tmp_path, 4, attempt=1)
    assert [r["step"] for r in kept] == [1, 0, 2, 3, 4]
    assert [r["step"] for r in superseded] == [5, 6, 5]
    on_disk = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert on_disk == kept
    moved = [json.loads(line) for line in (tmp_path / SUPERSEDED_FILE).read_text().splitlines()]
    assert [r["superseded_by_attempt"] for r in moved] == [1, 1, 1]
    kept, superseded = supersede_metrics(tmp_path, None, attempt=0)  # a fresh start keeps nothing
    assert kept == [] and len(superseded) == 5 and (tmp_path / "metrics.jsonl").read_text() == ""


# ---- the buffer's part of a checkpoint --------------------------------------------------------------
@dataclass(frozen=True)
class S:
    rollout_id: str
    batch_index: int
    policy_version: int
    group_id: int = 0


def test_snapshot_and_restore_keep_samples_counters_and_dropped_slots() -> None:
    buffer = StalenessBuffer(batch_size=2, max_staleness=1, capacity=8, group_size=1)
    buffer.put(S("a", 3, 2, 0), 3)
    buffer.put(S("stale", 3, 1, 1), 3)  # dropped: its slot is accounted
    buffer.put(S("b", 4, 3, 2), 3)
    samples, dropped = buffer.snapshot(range(3, 4))
    assert [s.rollout_id for s in samples] == ["a"] and dropped == {3: 1}
    assert buffer.num_held_from(4) == 1
    fresh = StalenessBuffer(batch_size=2, max_staleness=1, capacity=8, group_size=1)
    fresh.restore(samples, dropped, buffer.counters())
    assert fresh.stats.dropped_stale == 1 and fresh.stats.accepted == 2
    assert not fresh.put(S("a", 3, 2, 0), 3)  # a restored sample counts as seen
    assert [s.rollout_id for s in fresh.next_batch(3)] == ["a"]


def test_no_batch_takes_more_than_batch_size_samples() -> None:
    """A slot resampled after a scoring timeout, then the late original: one is surplus."""
    buffer = StalenessBuffer(batch_size=2, max_staleness=1, capacity=8, group_size=1)
    assert buffer.put(S("g0", 0, 0, group_id=0), 0)
    assert not buffer.put(S("g0-resampled", 0, 0, group_id=0), 0)  # group 0 already has its sample
    assert buffer.put(S("g1", 0, 0, group_id=1), 0)
    assert not buffer.put(S("extra", 0, 0, group_id=2), 0)  # the batch is full
    assert buffer.stats.dropped_surplus == 2
    assert len(buffer.next_batch(0)) == 2


# ---- resume ------------------------------------------------------------------------------------------
def _complete(run_dir: Path, step: int) -> Path:
    path = run_dir / "checkpoints" / f"step_{step}"
    path.mkdir(parents=True)
    (path / "COMPLETE").write_text("")
    return path


def test_resume_auto_starts_fresh_or_continues_and_latest_must_exist(tmp_path) -> None:
    assert resolve_checkpoint("auto", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="learner.resume=latest.*Fix: use learner.resume=auto"):
        resolve_checkpoint("latest", tmp_path)
    (tmp_path / "checkpoints" / "step_9").mkdir(parents=True)  # interrupted while saving: ignored
    _complete(tmp_path, 4)
    assert resolve_checkpoint("auto", tmp_path).name == "step_4"
    assert resolve_checkpoint("latest", tmp_path).name == "step_4"
    assert resolve_checkpoint(None, tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        resolve_checkpoint(str(tmp_path / "elsewhere"), tmp_path)
    moved = set_aside_checkpoints(tmp_path)  # learner.resume=null: the old checkpoints move away
    assert moved is not None and resolve_checkpoint("auto", tmp_path) is None and (moved / "step_4").is_dir()


def test_a_checkpoint_of_another_job_shape_is_refused(tmp_path) -> None:
    saved = job_shape(JobConfig(learner=LearnerConfig(batch_size=64)))
    with pytest.raises(ConfigError, match=r"learner.batch_size=32.*written with learner.batch_size=64.*Fix"):
        check_compatible(saved, JobConfig(learner=LearnerConfig(batch_size=32)), tmp_path)
    check_compatible(saved, JobConfig(learner=LearnerConfig(batch_size=64, num_steps=99)), tmp_path)


def test_resume_defaults_make_progress_survive() -> None:
    learner = LearnerConfig()
    assert learner.resume == "auto" and learner.checkpoint_every_s is not None and learner.checkpoint_every_s <= 600
    assert RunConfig().run_dir == Path("runs/demo")


# ---- failure attribution ----------------------------------------------------------------------------
def test_the_verdict_names_the_failed_rank_or_the_one_killed_by_a_signal(tmp_path) -> None:
    learner = RankStatus(str(tmp_path), role="learner", index=0, rank=0, attempt=0)
    actor = RankStatus(str(tmp_path), role="actor", index=0, rank=1, attempt=0)
    teacher = RankStatus(str(tmp_path), role="teacher", index=0, rank=2, attempt=0)
    for status in (learner, actor, teacher):
        status.running()
    try:
        raise TimeoutError("no weights")
    except TimeoutError as exc:
        actor.failed(exc)
    learner.terminated()
    lines = describe_failure(tmp_path)
    assert lines[0] == "actor 0 (rank 1) failed first: TimeoutError: no weights"
    assert lines[1].startswith("teacher 0 (rank 2, pid") and "killed by a signal" in lines[1]
    assert describe_failure(tmp_path / "none") == []
    RankStatus(None, role="learner", index=0, rank=0, attempt=0).running()  # no directory: a no-op


def test_every_resume_is_counted_whichever_checkpoint_it_went_back_to(tmp_path) -> None:
    from asyncopd.learner.resume import RESUMES_FILE, record_resume

    assert record_resume(tmp_path, {"checkpoint": "step_30", "samples_regenerated": 16}) == (1, 16)
    assert record_resume(tmp_path, {"checkpoint": "step_30", "samples_regenerated": 40}) == (2, 56)  # same again
    with (tmp_path / RESUMES_FILE).open("a") as f:
        f.write('{"torn')
    assert record_resume(tmp_path, {"checkpoint": "step_50", "samples_regenerated": 8}) == (3, 64)
