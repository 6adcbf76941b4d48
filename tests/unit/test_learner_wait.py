"""The learner's "waiting for" line: buffer fill, unscored rollouts, silent teachers."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from asyncopd.buffer import StalenessBuffer
from asyncopd.config import from_dict
from asyncopd.learner.io import LearnerIO
from asyncopd.types import ActorStats


@dataclass(frozen=True)
class S:
    rollout_id: str
    batch_index: int
    policy_version: int


def stats(index: int, *, unacked: int, silent: list[int], pool: str) -> ActorStats:
    return ActorStats(actor_index=index, policy_version=3, tokens_generated=0, engine_busy_s=0.0, wall_s=1.0,
                      weight_sync_s=0.0, num_retries=0, num_unscored=0, num_rejected_messages=0,
                      num_unacked=unacked, silent_teachers=silent, teacher_pool=pool)


def io_with(buffer: StalenessBuffer) -> LearnerIO:
    """A LearnerIO without sockets: the pump only reads the buffer it already holds."""
    io = object.__new__(LearnerIO)
    io.buffer, io.actor_stats = buffer, {}
    io.cfg = from_dict({})
    return io


def test_the_line_names_buffer_fill_unscored_rollouts_and_the_silent_teacher() -> None:
    buffer = StalenessBuffer(batch_size=8, max_staleness=1, capacity=24)
    for i in range(5):
        buffer.put(S(f"r{i}", 3, 3), 3)
    io = io_with(buffer)
    assert io.waiting_for(3, 31.0).endswith("buffer has 5/8 of its samples; no actor has reported yet")
    io.actor_stats = {0: stats(0, unacked=2, silent=[1], pool="teacher 0 ok (0 outstanding), teacher 1 SILENT 42s "
                               "(2 outstanding)"),
                      1: stats(1, unacked=1, silent=[1], pool="")}
    line = io.waiting_for(3, 31.0)
    assert line.startswith("waiting 31s for the batch of step 3: buffer has 5/8 of its samples; "
                           "3 rollouts sent and not yet scored; silent teachers: 1; ")
    assert "actor 0 (policy version 3): teacher 0 ok (0 outstanding), teacher 1 SILENT 42s" in line


def test_wait_batch_logs_while_it_waits(caplog, monkeypatch) -> None:
    buffer = StalenessBuffer(batch_size=2, max_staleness=1, capacity=8)
    io = io_with(buffer)
    io.wait_log_every_s = 0.0
    arrivals = iter([S("a", 0, 0), None, S("b", 0, 0)])

    def pump(timeout_s: float, learner_version: int) -> int:
        sample = next(arrivals)
        if sample is not None:
            buffer.put(sample, learner_version)
        return int(sample is not None)

    monkeypatch.setattr(io, "pump", pump)
    with caplog.at_level(logging.WARNING, logger="asyncopd.learner.io"):
        batch = io.wait_batch(0)
    assert [s.rollout_id for s in batch] == ["a", "b"]
    assert any("buffer has 1/2 of its samples" in r.getMessage() for r in caplog.records)
