"""The actor's side of the teacher pool: one DEALER per teacher, acknowledgements,
deadlines, retries to a different teacher, heartbeats and the degrade policy.

::

    send(rollout) ─pool.choose()─> outbox[j]
    flush() ─────────────────────> DEALER[j] ──RolloutBatch──> teacher j
    handle(j, ScoreAckBatch / Heartbeat) <──────────────────── teacher j
    tick(): heartbeats due, silent teachers' rollouts resent elsewhere,
            deadlines (teacher.request_timeout_s) -> retry, then drop or fail

Batching. :meth:`send` picks the teacher and starts the rollout's deadline at once
but only queues it; :meth:`flush` sends each teacher's queue as one
:class:`~asyncopd.types.RolloutBatch` (the actor flushes once per engine step).
Retries that :meth:`handle` and :meth:`tick` decide are flushed before they return.
Everything else is per rollout, as if each travelled alone: each has its own
acknowledgement (a :class:`~asyncopd.types.ScoreAckBatch` is read as its acks, a
lone :class:`~asyncopd.types.ScoreAck` still works), deadline, retry count and
failover.

Routing and health decisions live in the pure :class:`~asyncopd.transport.pool.TeacherPool`;
this class only moves messages. A rollout that no teacher scored after
``teacher.max_retries`` resends is returned by :meth:`tick` for the actor to sample
its slot again (``on_failure=drop``), or stops the actor (``fail``).

It owns no model and does not know about engines or weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncopd.config import TeacherConfig
from asyncopd.transport.pool import TeacherPool
from asyncopd.transport.sockets import Channel
from asyncopd.types import Heartbeat, Message, Rollout, RolloutBatch, ScoreAck, ScoreAckBatch

__all__ = ["TeacherPoolClient"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Unacked:
    rollout: Rollout
    request: Any
    """What the actor needs to sample this slot again (opaque here)."""
    deadline: float
    attempts: int = 0
    teachers: set[int] = field(default_factory=set)
    """Teachers this rollout was sent to."""


class TeacherPoolClient:
    """Sends rollouts to a pool of teachers and sees that each gets scored once."""

    def __init__(self, dealers: Sequence[Channel], cfg: TeacherConfig, *, actor_index: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dealers = list(dealers)
        self.cfg = cfg
        self.actor_index = actor_index
        self.clock = clock
        # A colocated teacher is the learner itself: it answers between training steps, so
        # its silence is a step in progress (minutes on a real model), there is no other
        # teacher to route to, and its death ends the job through the launcher anyway.
        silence_timeout_s = float("inf") if cfg.backend == "colocated" else cfg.silence_timeout_s
        self.pool = TeacherPool(len(self.dealers), silence_timeout_s=silence_timeout_s,
                                heartbeat_interval_s=cfg.heartbeat_interval_s, clock=clock)
        self.unacked: dict[str, _Unacked] = {}
        self.outbox: list[list[Rollout]] = [[] for _ in self.dealers]
        """Rollouts chosen for each teacher and not yet sent (until :meth:`flush`)."""
        self.num_retries = 0
        self.num_unscored = 0
        self.num_rejected = 0
        self.policy_version = 0

    # ---- sending -----------------------------------------------------------------------------
    def send(self, rollout: Rollout, request: Any) -> None:
        """Route ``rollout`` and queue it for its teacher; :meth:`flush` sends the queues."""
        entry = _Unacked(rollout, request, self._deadline())
        self.unacked[rollout.rollout_id] = entry
        self._send_to(self.pool.choose(), entry)

    def flush(self) -> int:
        """Send each teacher's queued rollouts as one RolloutBatch; returns the number of batches."""
        num_batches = 0
        for teacher, queued in enumerate(self.outbox):
            if queued:
                self.dealers[teacher].send(RolloutBatch.of(queued))
                self.outbox[teacher] = []
                num_batches += 1
        return num_batches

    def _send_to(self, teacher: int, entry: _Unacked) -> None:
        entry.teachers.add(teacher)
        self.pool.on_send(teacher, entry.rollout.rollout_id)
        self.outbox[teacher].append(entry.rollout)

    def _deadline(self) -> float:
        return self.clock() + self.cfg.request_timeout_s

    # ---- receiving ---------------------------------------------------------------------------
    def handle(self, teacher: int, message: Message) -> list[Any]:
        """One message from ``teacher``'s DEALER; returns requests whose slots to sample again
        (retries it decides are sent before it returns)."""
        if isinstance(message, Heartbeat):
            self._heard(teacher, None)
            return []
        if isinstance(message, ScoreAck):
            acks = [message]
        elif isinstance(message, ScoreAckBatch):
            acks = message.acks
            if not acks:  # only dropped elements (counted by the channel): still an answer
                self._heard(teacher, None)
        else:
            self.num_rejected += 1
            return []
        resample: list[Any] = []
        for ack in acks:
            resample += self._settle(teacher, ack)
        self.flush()
        return resample

    def _settle(self, teacher: int, ack: ScoreAck) -> list[Any]:
        self._heard(teacher, ack.rollout_id if ack.ok else None)
        entry = self.unacked.get(ack.rollout_id)
        if entry is None:
            return []  # a late ack of a rollout another teacher already scored (or one given up)
        if ack.ok:
            del self.unacked[ack.rollout_id]
            return []
        logger.warning("actor %d: teacher %d could not score %s: %s", self.actor_index, teacher,
                       ack.rollout_id, ack.error)
        self.pool.teachers[teacher].outstanding.discard(ack.rollout_id)
        return self._retry(ack.rollout_id)

    def _heard(self, teacher: int, rollout_id: str | None) -> None:
        if self.pool.on_reply(teacher, rollout_id):
            logger.warning("actor %d: teacher %d answers again; it gets work again (%s)", self.actor_index,
                           teacher, self.pool.describe())

    # ---- time --------------------------------------------------------------------------------
    def tick(self) -> list[Any]:
        """Heartbeats, silent teachers and deadlines; returns requests to sample again.
        Sends what is queued, the retries it decided included."""
        now = self.clock()
        for teacher in self.pool.heartbeats_due():
            self.pool.on_send(teacher)
            self.dealers[teacher].send(Heartbeat(policy_version=self.policy_version, sent_at=now))
        resample: list[Any] = []
        for teacher in self.pool.check():
            healthy = [self.pool.teachers[k] for k in self.pool.healthy()]
            if not healthy:
                # Nowhere to route to: resending would only queue copies at the same busy
                # teacher and spend its retries. Its rollouts wait for their deadline.
                logger.warning("actor %d: teacher %d silent for %.0fs (teacher.silence_timeout_s=%g) and no other "
                               "teacher is healthy; its %d rollouts wait up to teacher.request_timeout_s=%g (%s)",
                               self.actor_index, teacher, self.pool.silent_for_s(teacher),
                               self.cfg.silence_timeout_s, len(self.pool.outstanding_at(teacher)),
                               self.cfg.request_timeout_s, self.pool.describe())
                continue
            # Its rollouts that no healthy teacher holds as well (those wait for their deadline).
            stranded = [rid for rid in self.pool.outstanding_at(teacher)
                        if rid in self.unacked and not any(rid in t.outstanding for t in healthy)]
            logger.warning("actor %d: teacher %d silent for %.0fs (teacher.silence_timeout_s=%g); routing around "
                           "it and resending its %d rollouts (%s)", self.actor_index, teacher,
                           self.pool.silent_for_s(teacher), self.cfg.silence_timeout_s, len(stranded),
                           self.pool.describe())
            for rollout_id in stranded:
                if rollout_id in self.unacked:
                    resample += self._retry(rollout_id)
        for rollout_id in [rid for rid, e in self.unacked.items() if e.deadline < now]:
            logger.warning("actor %d: no score for %s within teacher.request_timeout_s=%g", self.actor_index,
                           rollout_id, self.cfg.request_timeout_s)
            resample += self._retry(rollout_id)
        self.flush()
        return resample

    def _retry(self, rollout_id: str) -> list[Any]:
        entry = self.unacked[rollout_id]
        if entry.attempts < self.cfg.max_retries:
            entry.attempts += 1
            entry.deadline = self._deadline()
            self.num_retries += 1
            self._send_to(self.pool.choose(exclude=entry.teachers), entry)
            return []
        del self.unacked[rollout_id]
        self.pool.resolve(rollout_id)
        self.num_unscored += 1
        if self.cfg.on_failure == "fail":
            raise RuntimeError(
                f"rollout {rollout_id} was not scored after {entry.attempts + 1} attempts (teachers "
                f"{sorted(entry.teachers)}) and teacher.on_failure=fail. Fix: check the teacher ranks' logs, raise "
                "teacher.request_timeout_s, or set teacher.on_failure=drop to resample such slots."
            )
        logger.warning("actor %d: dropping unscored %s and sampling its slot again", self.actor_index, rollout_id)
        return [entry.request]

    # ---- telemetry ---------------------------------------------------------------------------
    @property
    def num_rejected_messages(self) -> int:
        return self.num_rejected + sum(d.num_rejected for d in self.dealers)

    def close(self) -> None:
        for dealer in self.dealers:
            dealer.close()
