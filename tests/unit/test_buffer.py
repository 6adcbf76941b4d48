"""The staleness buffer: slots, staleness bound, duplicates, capacity — all counted."""

from dataclasses import dataclass

import pytest

from asyncopd.buffer import StalenessBuffer


@dataclass(frozen=True)
class S:
    rollout_id: str
    batch_index: int
    policy_version: int


def fill(buffer: StalenessBuffer, batch_index: int, n: int, version: int, learner_version: int, tag: str = "") -> None:
    for i in range(n):
        buffer.put(S(f"{tag}{batch_index}-{i}", batch_index, version), learner_version)


def test_batch_is_released_only_when_all_slots_are_accounted_for() -> None:
    buffer = StalenessBuffer(batch_size=4, max_staleness=1, capacity=12)
    fill(buffer, 0, 3, version=0, learner_version=0)
    assert buffer.next_batch(0) is None
    fill(buffer, 1, 4, version=0, learner_version=0)  # the next step's samples do not complete step 0
    assert buffer.next_batch(0) is None
    buffer.put(S("last", 0, 0), 0)
    batch = buffer.next_batch(0)
    assert batch is not None and len(batch) == 4 and {s.batch_index for s in batch} == {0}
    assert len(buffer) == 4


def test_sample_staler_than_bound_is_refused_and_counted() -> None:
    buffer = StalenessBuffer(batch_size=2, max_staleness=1, capacity=8)
    assert buffer.put(S("ok", 3, 2), learner_version=3)        # staleness 1
    assert not buffer.put(S("stale", 3, 1), learner_version=3)  # staleness 2
    assert buffer.stats.dropped_stale == 1
    batch = buffer.next_batch(3)  # the dropped slot is accounted: a smaller batch, no stall
    assert [s.rollout_id for s in batch] == ["ok"]
    assert buffer.stats.as_metrics()["buffer/staleness_max"] == 1


def test_staleness_is_checked_again_when_the_batch_is_taken() -> None:
    buffer = StalenessBuffer(batch_size=1, max_staleness=0, capacity=4)
    assert buffer.put(S("a", 2, 1), learner_version=1)  # fresh on arrival (staleness 0)
    assert buffer.next_batch(2) == []                   # staleness 1 > 0 by the time step 2 runs
    assert buffer.stats.dropped_stale == 1


@pytest.mark.parametrize("eta", [0, 1, 2])
def test_released_batches_never_exceed_the_bound(eta: int) -> None:
    buffer = StalenessBuffer(batch_size=2, max_staleness=eta, capacity=2 * (eta + 2))
    for step in range(6):
        for batch_index in range(step, step + eta + 1):
            fill(buffer, batch_index, 2, version=max(0, batch_index - eta), learner_version=step, tag=f"s{step}-")
        batch = buffer.next_batch(step)
        assert batch is not None
        assert all(step - s.policy_version <= eta for s in batch)
    assert buffer.stats.staleness_max <= eta


def test_duplicates_late_samples_and_overflow_are_counted() -> None:
    buffer = StalenessBuffer(batch_size=2, max_staleness=1, capacity=2)
    assert buffer.put(S("a", 0, 0), 0)
    assert not buffer.put(S("a", 0, 0), 0)
    assert buffer.stats.duplicates == 1
    assert buffer.put(S("b", 1, 0), 0)
    assert not buffer.put(S("c", 1, 0), 0)  # full
    assert buffer.stats.dropped_full == 1
    buffer.mark_dropped(0)
    assert len(buffer.next_batch(0)) == 1
    assert not buffer.put(S("late", 0, 0), 1)
    assert buffer.stats.dropped_late == 1


@dataclass(frozen=True)
class Resample:
    """A sample that replaces a dropped one: it fills the dropped sample's slot."""

    rollout_id: str
    batch_index: int
    policy_version: int
    slot: str


def test_a_late_original_and_its_resample_fill_one_slot() -> None:
    # teacher.on_failure=drop: the actor gave up on "0-0" and sampled its slot again as
    # "0-0r"; the frozen teacher then thawed and scored "0-0" after all.
    buffer = StalenessBuffer(batch_size=4, max_staleness=1, capacity=12)
    fill(buffer, 0, 3, version=0, learner_version=0, tag="a")
    assert buffer.put(Resample("0-0r", 0, 0, slot="late-0"), 0)
    assert not buffer.put(S("late-0", 0, 0), 0)  # the original, late: its slot is taken
    assert buffer.stats.dropped_superseded == 1
    batch = buffer.next_batch(0)
    assert sorted(s.rollout_id for s in batch) == ["0-0r", "a0-0", "a0-1", "a0-2"]


def test_the_original_arriving_first_refuses_the_resample() -> None:
    buffer = StalenessBuffer(batch_size=2, max_staleness=1, capacity=8)
    assert buffer.put(S("x", 0, 0), 0)
    assert not buffer.put(Resample("x-r", 0, 0, slot="x"), 0)
    assert buffer.stats.dropped_superseded == 1 and not buffer.ready(0)


def test_a_step_never_holds_more_than_batch_size_samples() -> None:
    buffer = StalenessBuffer(batch_size=8, max_staleness=1, capacity=32)
    fill(buffer, 0, 14, version=0, learner_version=0)  # the 14-sample step of issue 10
    batch = buffer.next_batch(0)
    assert len(batch) == 8 and buffer.stats.dropped_surplus == 6
    assert buffer.slots_accounted(1) == 0


def test_bookkeeping_stays_bounded_over_a_long_job() -> None:
    # Issue 10's soak: the ids of every rollout ever received were kept (~60 MB/h of learner
    # RSS at the demo's rate). Only the steps in flight (max_staleness + 1) are remembered now.
    eta, batch = 2, 16
    buffer = StalenessBuffer(batch_size=batch, max_staleness=eta, capacity=batch * (eta + 2))
    for step in range(2_000):
        for batch_index in range(0, eta + 1) if step == 0 else [step + eta]:  # eta steps ahead
            fill(buffer, batch_index, batch, version=max(0, batch_index - eta), learner_version=step)
        assert len(buffer.next_batch(step)) == batch
        remembered = sum(map(len, buffer._seen.values())) + sum(map(len, buffer._slots.values()))
        assert remembered <= 2 * batch * eta and max(buffer._seen, default=step) <= step + eta
    assert buffer.stats.accepted == (2_000 + eta) * batch and len(buffer) == batch * eta


def test_a_copy_arriving_after_its_step_was_trained_is_refused_as_late() -> None:
    buffer = StalenessBuffer(batch_size=1, max_staleness=1, capacity=4)
    assert buffer.put(S("a", 0, 0), 0)
    assert len(buffer.next_batch(0)) == 1
    assert not buffer.put(S("a", 0, 0), 1)  # its id is forgotten, its step is trained
    assert not buffer.put(Resample("a-r", 0, 0, slot="a"), 1)
    assert buffer.stats.dropped_late == 2 and buffer.stats.accepted == 1


@dataclass(frozen=True)
class G:
    rollout_id: str
    batch_index: int
    policy_version: int
    group_id: int


def test_group_rule_counts_per_step_and_survives_restore_and_taken_batches() -> None:
    buffer = StalenessBuffer(batch_size=4, max_staleness=2, capacity=16, group_size=2)
    assert buffer.put(G("a", 0, 0, 7), 0) and buffer.put(G("b", 0, 0, 7), 0)
    assert not buffer.put(G("c", 0, 0, 7), 0)  # group 7 of step 0 is full
    assert buffer.put(G("d", 1, 0, 7), 0)  # the same group id in another step counts apart
    assert buffer.stats.dropped_surplus == 1
    samples, dropped = buffer.snapshot(range(0, 2))
    fresh = StalenessBuffer(batch_size=4, max_staleness=2, capacity=16, group_size=2)
    fresh.restore(samples, dropped)
    assert not fresh.put(G("e", 0, 0, 7), 0) and fresh.put(G("f", 1, 0, 7), 0)
    assert not fresh.put(G("g", 1, 0, 7), 0) and fresh.stats.dropped_surplus == 2
    fresh.mark_dropped(0, 2)
    assert [s.rollout_id for s in fresh.next_batch(0)] == ["a", "b"]
    assert fresh._group_counts == {(1, 7): 2}  # a taken step's counts are forgotten with it
