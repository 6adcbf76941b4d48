"""The bounded, staleness-aware buffer between the teacher pool and the learner.

Pure logic: no sockets, no threads, no torch. The learner loop feeds it scored
rollouts and asks for the batch of its current step.

Slots. Actors stamp every training rollout with ``batch_index``, the learner step
it is generated for (actor ``a`` fills ``batch_size / num_actors`` slots of each
step, whole prompt groups at a time, and never starts a slot more than
``max_staleness`` steps ahead of its weights). Batch ``k`` is therefore exactly
the samples stamped ``k``: deterministic, groups kept together. A slot is
*accounted* once its sample arrived or was dropped, so a drop shrinks a batch
(counted) instead of stalling the learner.

Rules, each counted in :attr:`stats`:

- a sample whose staleness ``learner_version - policy_version`` exceeds
  ``max_staleness`` is refused (``dropped_stale``), checked on arrival and again
  when its batch is taken;
- a sample for a step already trained is refused (``dropped_late``);
- a second copy of a rollout (a retried scoring that both teachers finished) is
  refused (``duplicates``; once its step is trained, as ``dropped_late``);
- a second sample for one slot (a dropped rollout that was scored late after all,
  next to the resample that replaced it: both carry the slot, see
  ``Rollout.slot_id``) is refused (``dropped_superseded``), and so is any sample
  that would give a step more than ``batch_size`` samples;
- a sample arriving while ``capacity`` samples are held is refused
  (``dropped_full``); with slots this only happens on a bug, never silently;
- a sample for a batch whose ``batch_size`` slots are all accounted, or (with
  ``group_size``) for a prompt group that already holds ``group_size`` samples, is
  refused (``dropped_surplus``): a slot resampled after its scoring timed out
  must not be trained next to the late original, so no step trains more than
  ``batch_size`` samples.

Memory. What the rules need to remember (rollout ids seen, slots taken) is kept per
step and forgotten when the step's batch is taken: anything for a trained step is
refused as late anyway. A job of any length holds the bookkeeping of at most the
``max_staleness + 1`` steps in flight (the 30-minute soak of issue 10 grew by the
ids of every rollout ever received before).

Restarts. :meth:`StalenessBuffer.snapshot` hands out the held samples of some
batches (and their dropped-slot counts) without taking them, for a checkpoint;
:meth:`StalenessBuffer.restore` puts them back in a fresh buffer, with the counters.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Generic, Protocol, TypeVar

__all__ = ["Sample", "BufferStats", "StalenessBuffer"]


class Sample(Protocol):
    @property
    def rollout_id(self) -> str: ...
    @property
    def batch_index(self) -> int: ...
    @property
    def policy_version(self) -> int: ...
    @property
    def group_id(self) -> int: ...


S = TypeVar("S", bound=Sample)


@dataclass(slots=True)
class BufferStats:
    accepted: int = 0
    dropped_stale: int = 0
    dropped_late: int = 0
    dropped_full: int = 0
    duplicates: int = 0
    dropped_superseded: int = 0
    dropped_surplus: int = 0
    batches: int = 0
    staleness_max: int = 0
    """Largest staleness of any sample handed to the learner so far."""
    last_batch_staleness: list[int] = field(default_factory=list)

    def as_metrics(self) -> dict[str, float]:
        last = self.last_batch_staleness
        return {
            "buffer/accepted": self.accepted,
            "buffer/dropped_stale": self.dropped_stale,
            "buffer/dropped_late": self.dropped_late,
            "buffer/dropped_full": self.dropped_full,
            "buffer/duplicates": self.duplicates,
            "buffer/dropped_superseded": self.dropped_superseded,
            "buffer/dropped_surplus": self.dropped_surplus,
            "buffer/staleness_max": max(last) if last else 0,
            "buffer/staleness_mean": sum(last) / len(last) if last else 0.0,
            "buffer/staleness_max_overall": self.staleness_max,
        }


class StalenessBuffer(Generic[S]):
    """Holds scored samples by slot until the learner takes their batch."""

    def __init__(self, *, batch_size: int, max_staleness: int, capacity: int, group_size: int | None = None) -> None:
        if capacity < batch_size:
            raise ValueError(f"capacity={capacity} is smaller than batch_size={batch_size}")
        self.batch_size = batch_size
        self.group_size = group_size
        self.max_staleness = max_staleness
        self.capacity = capacity
        self.stats = BufferStats()
        self._held: dict[int, list[S]] = defaultdict(list)
        self._dropped_slots: dict[int, int] = defaultdict(int)
        self._seen: dict[int, set[str]] = defaultdict(set)
        """Rollout ids received, by step (batch_index); a step's set goes with its batch."""
        self._slots: dict[int, set[str]] = defaultdict(set)
        """Slots taken, by step; a resample carries its slot's batch_index."""
        self._num_held = 0
        self._group_counts: dict[tuple[int, int], int] = defaultdict(int)
        """Samples held, by (step, group_id): the group rule's count without a scan per put."""

    def __len__(self) -> int:
        return self._num_held

    def staleness(self, sample: S, learner_version: int) -> int:
        return learner_version - sample.policy_version

    def put(self, sample: S, learner_version: int) -> bool:
        """Offer one sample; returns whether it was kept."""
        if sample.batch_index < learner_version:
            self.stats.dropped_late += 1
            return False
        seen = self._seen[sample.batch_index]
        if sample.rollout_id in seen:
            self.stats.duplicates += 1
            return False
        seen.add(sample.rollout_id)
        slots = self._slots[sample.batch_index]
        slot = getattr(sample, "slot", None) or sample.rollout_id
        if slot in slots:
            self.stats.dropped_superseded += 1
            return False
        slots.add(slot)
        if self.staleness(sample, learner_version) > self.max_staleness:
            self.stats.dropped_stale += 1
            self._dropped_slots[sample.batch_index] += 1
            return False
        if self._is_surplus(sample):
            self.stats.dropped_surplus += 1
            return False
        if self._num_held >= self.capacity:
            self.stats.dropped_full += 1
            self._dropped_slots[sample.batch_index] += 1
            return False
        self._held[sample.batch_index].append(sample)
        if self.group_size is not None:
            self._group_counts[sample.batch_index, sample.group_id] += 1
        self._num_held += 1
        self.stats.accepted += 1
        return True

    def _is_surplus(self, sample: S) -> bool:
        held = self._held.get(sample.batch_index, ())
        if len(held) + self._dropped_slots.get(sample.batch_index, 0) >= self.batch_size:
            return True
        if self.group_size is None:
            return False
        return self._group_counts.get((sample.batch_index, sample.group_id), 0) >= self.group_size

    def num_held_from(self, batch_index: int) -> int:
        """Samples held for steps ``batch_index`` and later."""
        return sum(len(v) for k, v in self._held.items() if k >= batch_index)

    def snapshot(self, batch_indices: range) -> tuple[list[S], dict[int, int]]:
        """(held samples, dropped-slot counts) of ``batch_indices``, left in place."""
        samples = [s for k in batch_indices for s in self._held.get(k, ())]
        dropped = {k: self._dropped_slots[k] for k in batch_indices if self._dropped_slots.get(k)}
        return samples, dropped

    def restore(self, samples: list[S], dropped: dict[int, int], stats: dict[str, int] | None = None) -> None:
        """Put a :meth:`snapshot` (and the counters of :meth:`BufferStats` as a dict)
        into this fresh buffer; the samples count as seen (a copy is a duplicate)."""
        if self._num_held or self._seen:
            raise RuntimeError("restore() needs a fresh buffer")
        if stats:
            for name, value in stats.items():
                if name != "last_batch_staleness":
                    setattr(self.stats, name, value)
        for sample in samples:
            self._seen[sample.batch_index].add(sample.rollout_id)
            self._slots[sample.batch_index].add(getattr(sample, "slot", None) or sample.rollout_id)
            self._held[sample.batch_index].append(sample)
            if self.group_size is not None:
                self._group_counts[sample.batch_index, sample.group_id] += 1
        self._num_held = len(samples)
        for k, count in dropped.items():
            self._dropped_slots[int(k)] += count

    def counters(self) -> dict[str, int]:
        """The cumulative counters of :attr:`stats` (what :meth:`restore` takes back)."""
        return {f.name: getattr(self.stats, f.name) for f in fields(self.stats) if f.name != "last_batch_staleness"}

    def mark_dropped(self, batch_index: int, count: int = 1) -> None:
        """Account for slots of ``batch_index`` that will never arrive."""
        self._dropped_slots[batch_index] += count

    def slots_accounted(self, batch_index: int) -> int:
        """Slots of step ``batch_index`` held or known dropped (the step is ready at batch_size)."""
        return len(self._held.get(batch_index, ())) + self._dropped_slots.get(batch_index, 0)

    def ready(self, learner_version: int) -> bool:
        return self.slots_accounted(learner_version) >= self.batch_size

    def next_batch(self, learner_version: int) -> list[S] | None:
        """The samples of step ``learner_version`` once all its slots are accounted
        for, after a last staleness check; None while slots are still missing."""
        if not self.ready(learner_version):
            return None
        # In rollout-id order, not arrival order: arrival depends on thread timing, and the
        # learner's sums over the batch would then differ in their last bits between runs.
        candidates = sorted(self._held.pop(learner_version, []), key=lambda s: s.rollout_id)
        self._dropped_slots.pop(learner_version, None)
        for key in [key for key in self._group_counts if key[0] <= learner_version]:
            del self._group_counts[key]
        for memory in (self._seen, self._slots):  # later copies of a trained step are late anyway
            for trained in [k for k in memory if k <= learner_version]:
                del memory[trained]
        self._num_held -= len(candidates)
        batch: list[S] = []
        for sample in candidates:
            if self.staleness(sample, learner_version) > self.max_staleness:
                self.stats.dropped_stale += 1
            else:
                batch.append(sample)
        staleness = [self.staleness(s, learner_version) for s in batch]
        self.stats.last_batch_staleness = staleness
        self.stats.staleness_max = max([self.stats.staleness_max, *staleness])
        self.stats.batches += 1
        return batch
