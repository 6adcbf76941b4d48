"""Routing and health of a teacher pool, as one client (an actor) sees it.

Pure bookkeeping: no sockets, no threads; the clock is injected so tests drive it.
The actor's pool client (:mod:`asyncopd.actor.teachers`) sends, receives and asks
this class where to send and whom to suspect.

Health comes from answers. A teacher is *silent* when something sent to it (a
rollout or a heartbeat) has waited more than ``silence_timeout_s`` and nothing at
all came back from it since; a silent teacher is marked unhealthy and gets no new
work, and its outstanding rollouts are the caller's to resend elsewhere. Any answer
from it (an acknowledgement, even a late one, or a heartbeat reply) makes it healthy
again: a frozen teacher that thaws rejoins by itself. Heartbeats go to every teacher
every ``heartbeat_interval_s`` so that an idle teacher's death is noticed too, and an
unhealthy one is probed.

Routing: a new rollout goes to the healthy teacher with the fewest outstanding
rollouts (ties in turn); a retry goes to a teacher that has not had it yet when a
healthy one exists, so it never goes back to the frozen teacher while another works.
With no healthy teacher left, the one heard from most recently is chosen.

This module does not know what a rollout is beyond its id.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

__all__ = ["TeacherHealth", "TeacherPool"]


@dataclass(slots=True)
class TeacherHealth:
    """One teacher, as the client sees it."""

    index: int
    healthy: bool = True
    outstanding: set[str] = field(default_factory=set)
    """Rollout ids sent to it and not yet answered (by it or by another teacher)."""
    last_heard: float = 0.0
    """Clock time of its last answer (or of pool creation)."""
    waiting_since: float | None = None
    """Clock time of the oldest send not answered since ``last_heard``; None: nothing awaited."""
    last_heartbeat: float | None = None
    num_marked_unhealthy: int = 0
    num_rejoined: int = 0


class TeacherPool:
    """Which teacher gets the next rollout, and which teachers are silent."""

    def __init__(self, num_teachers: int, *, silence_timeout_s: float, heartbeat_interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if num_teachers < 1:
            raise ValueError(f"num_teachers={num_teachers}: a pool needs at least one teacher")
        self.clock = clock
        self.silence_timeout_s = silence_timeout_s
        self.heartbeat_interval_s = heartbeat_interval_s
        now = clock()
        self.teachers = [TeacherHealth(index=j, last_heard=now) for j in range(num_teachers)]
        self._turn = 0

    # ---- routing -----------------------------------------------------------------------------
    def choose(self, exclude: Collection[int] = ()) -> int:
        """The teacher for the next send; ``exclude``: teachers that already had this rollout."""
        healthy = [t for t in self.teachers if t.healthy]
        candidates = [t for t in healthy if t.index not in exclude] or healthy
        if not candidates:  # every teacher is silent: the likeliest to answer
            return max(self.teachers, key=lambda t: (t.last_heard, -t.index)).index
        fewest = min(len(t.outstanding) for t in candidates)
        tied = [t.index for t in candidates if len(t.outstanding) == fewest]
        n = len(self.teachers)
        choice = min(tied, key=lambda j: (j - self._turn) % n)
        self._turn = (choice + 1) % n
        return choice

    def healthy(self) -> list[int]:
        return [t.index for t in self.teachers if t.healthy]

    def silent(self) -> list[int]:
        return [t.index for t in self.teachers if not t.healthy]

    # ---- events ------------------------------------------------------------------------------
    def on_send(self, teacher: int, rollout_id: str | None = None) -> None:
        """Something went to ``teacher``: a rollout (its id) or a heartbeat (None)."""
        t = self.teachers[teacher]
        now = self.clock()
        if rollout_id is not None:
            t.outstanding.add(rollout_id)
        else:
            t.last_heartbeat = now
        if t.waiting_since is None:
            t.waiting_since = now

    def on_reply(self, teacher: int, rollout_id: str | None = None) -> bool:
        """``teacher`` answered (an ack of ``rollout_id``, or a heartbeat reply: None).
        True when this brings an unhealthy teacher back."""
        t = self.teachers[teacher]
        now = self.clock()
        t.last_heard = now
        if rollout_id is not None:
            self.resolve(rollout_id)
        # It is alive: what it still holds is awaited from now on.
        t.waiting_since = now if t.outstanding else None
        if t.healthy:
            return False
        t.healthy = True
        t.num_rejoined += 1
        return True

    def on_failure(self, teacher: int) -> bool:
        """``teacher`` failed outright (e.g. a refused connection): unhealthy now, without
        waiting for silence. True when it was healthy until now."""
        t = self.teachers[teacher]
        if not t.healthy:
            return False
        t.healthy = False
        t.num_marked_unhealthy += 1
        return True

    def resolve(self, rollout_id: str) -> None:
        """``rollout_id`` needs no answer any more (scored by someone, or given up)."""
        for t in self.teachers:
            t.outstanding.discard(rollout_id)

    def heartbeats_due(self) -> list[int]:
        """Teachers to send a heartbeat to now (every ``heartbeat_interval_s``)."""
        now = self.clock()
        return [t.index for t in self.teachers
                if t.last_heartbeat is None or now - t.last_heartbeat >= self.heartbeat_interval_s]

    def check(self) -> list[int]:
        """Mark teachers silent for longer than ``silence_timeout_s`` unhealthy; returns
        the ones marked now (the caller resends their outstanding rollouts)."""
        now = self.clock()
        newly: list[int] = []
        for t in self.teachers:
            if t.healthy and t.waiting_since is not None and now - t.waiting_since > self.silence_timeout_s:
                t.healthy = False
                t.num_marked_unhealthy += 1
                newly.append(t.index)
        return newly

    def silent_for_s(self, teacher: int) -> float:
        """Seconds since ``teacher`` last answered."""
        return self.clock() - self.teachers[teacher].last_heard

    def outstanding_at(self, teacher: int) -> list[str]:
        return sorted(self.teachers[teacher].outstanding)

    # ---- telemetry ---------------------------------------------------------------------------
    @property
    def num_marked_unhealthy(self) -> int:
        return sum(t.num_marked_unhealthy for t in self.teachers)

    @property
    def num_rejoined(self) -> int:
        return sum(t.num_rejoined for t in self.teachers)

    def describe(self) -> str:
        """One line: each teacher's health, outstanding rollouts and silence, e.g.
        ``teacher 0 ok (3 outstanding), teacher 1 SILENT 42s (5 outstanding)``."""
        parts = []
        for t in self.teachers:
            state = "ok" if t.healthy else f"SILENT {self.silent_for_s(t.index):.0f}s"
            parts.append(f"teacher {t.index} {state} ({len(t.outstanding)} outstanding)")
        return ", ".join(parts)
