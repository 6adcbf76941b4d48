"""Everything learner rank 0 does besides computing: its inbox, the buffer, eval
results, actor telemetry, weight announcements and shutdown.

::

    teachers ─ScoredBatch───┐                      ┌─> buffer (train) ─> batch of step k
    actors  ──ActorStats────┴─> PULL inbox ─> route ┼─> EvalAccumulator (eval_*)
                                                    └─> latest ActorStats per actor
    WeightUpdate / Shutdown ─> PUSH to each actor's and teacher's control inbox

With an in-process teacher (``teacher.backend=colocated``, no teacher ranks) the
actors' DEALERs connect to a ROUTER here instead::

    actors ─RolloutBatch─> ROUTER ─train─> ScoredRollout with NaN teacher log-probs ─> buffer
                             │               (the train step scores it), ScoreAckBatch at once
                             └──eval──> score (the learner's teacher) ─> EvalAccumulator, ScoreAckBatch

Batches are unpacked here: each element is routed, and acknowledged, as if it had
come alone (a lone ScoredRollout or Rollout from an older peer is a batch of one).

The buffer is injected by the launcher (roles do not import each other).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import zmq

from asyncopd import trace
from asyncopd.config import JobConfig
from asyncopd.learner.evaluation import EvalAccumulator
from asyncopd.learner.teacher import placeholder_teacher_logprobs
from asyncopd.transport.discovery import Rendezvous
from asyncopd.transport.sockets import Channel, poll
from asyncopd.types import (ActorStats, Heartbeat, Rollout, RolloutBatch, ScoreAckBatch, ScoredBatch,
                            ScoredRollout, Shutdown, WeightUpdate)

__all__ = ["LearnerIO"]

logger = logging.getLogger(__name__)


class LearnerIO:
    wait_log_every_s = 30.0
    """While a batch is awaited, say what is missing this often (seconds)."""

    def __init__(self, cfg: JobConfig, rendezvous: Rendezvous, *, buffer, evaluation: EvalAccumulator,
                 on_eval: Callable[[dict[str, float]], None],
                 score: Callable[[Sequence[Rollout]], list[np.ndarray]] | None = None) -> None:
        """``score``: the in-process teacher's sampled-token log-probs of rollouts
        (teacher.backend=colocated; rank 0 then receives the actors' rollouts itself)."""
        self.cfg = cfg
        self.rendezvous = rendezvous
        self.buffer = buffer
        self.evaluation = evaluation
        self.on_eval = on_eval
        self.inbox = Channel(zmq.PULL, bind_host=cfg.cluster.host)
        rendezvous.publish("learner/inbox", self.inbox.address)
        self.score = score
        self.rollouts: Channel | None = None
        if cfg.teacher.backend == "colocated":
            self.rollouts = Channel(zmq.ROUTER, bind_host=cfg.cluster.host)
            rendezvous.publish("learner/rollouts", self.rollouts.address)
        self.actor_controls = [Channel(zmq.PUSH, connect=[rendezvous.lookup(f"actor/{i}/inbox")])
                               for i in range(cfg.cluster.actors)]
        self.teacher_controls = [Channel(zmq.PUSH, connect=[rendezvous.lookup(f"teacher/{j}/inbox")])
                                 for j in range(cfg.cluster.teachers)]
        self.actor_stats: dict[int, ActorStats] = {}
        self.num_unexpected = 0
        self.last_eval: dict[str, float] = {}

    def pump(self, timeout_s: float, learner_version: int) -> int:
        """Route whatever arrives within ``timeout_s`` (then everything queued);
        returns the number of scored rollouts routed."""
        num_from_actors = 0
        if self.rollouts is not None:
            poll([self.inbox, self.rollouts], timeout_s)
            num_from_actors = self._receive_rollouts(learner_version)
            timeout_s = 0.0
        received = self.inbox.recv(timeout_s=timeout_s)
        num_scored = 0
        while received is not None:
            message = received[1]
            if isinstance(message, (ScoredBatch, ScoredRollout)):
                scored = message.scored if isinstance(message, ScoredBatch) else [message]
                num_scored += len(scored)
                for one in scored:
                    self._route(one, learner_version)
            elif isinstance(message, ActorStats):
                self.actor_stats[message.actor_index] = message
            else:
                self.num_unexpected += 1
                logger.warning("learner inbox: ignored a %s", type(message).__name__)
            received = self.inbox.recv(timeout_s=0.0)
        return num_scored + num_from_actors

    def _route(self, scored: ScoredRollout, learner_version: int) -> None:
        if scored.rollout.kind == "train":
            self.buffer.put(scored, learner_version)
            return
        metrics = self.evaluation.add(scored)
        if metrics is not None:
            self.last_eval = metrics
            self.on_eval(metrics)

    def _receive_rollouts(self, learner_version: int) -> int:
        """Colocated teacher: take the actors' rollouts, acknowledge training ones at once
        (scored later, in the train step) and score evaluation ones now; returns how many
        training rollouts arrived."""
        assert self.rollouts is not None and self.score is not None
        evals: list[tuple[bytes, Rollout]] = []
        train: list[tuple[bytes, Rollout]] = []
        while (received := self.rollouts.recv(timeout_s=0.0)) is not None:
            identity, message = received
            if isinstance(message, Heartbeat) and identity is not None:
                self.rollouts.send(message, identity=identity)  # the actors' pool client: alive
                continue
            if identity is not None and isinstance(message, RolloutBatch):
                rollouts = message.rollouts
            elif identity is not None and isinstance(message, Rollout):  # an older actor: a batch of one
                rollouts = [message]
            else:
                self.rollouts.num_rejected += 1
                logger.warning("learner rollout socket: ignored a %s", type(message).__name__)
                continue
            for rollout in rollouts:
                (train if rollout.kind == "train" else evals).append((identity, rollout))
        for _, rollout in train:
            self.buffer.put(ScoredRollout(rollout=rollout, teacher_logprobs=placeholder_teacher_logprobs(rollout),
                                          teacher_index=-1, score_s=0.0, policy_version=rollout.policy_version),
                            learner_version)
        self._ack(train, None)
        if not evals:
            return len(train)
        try:
            with trace.span("score", rollouts=len(evals)):
                scores = self.score([rollout for _, rollout in evals])
        except Exception as exc:  # the actors retry (teacher.max_retries), then degrade
            logger.exception("learner: scoring %d evaluation rollouts failed", len(evals))
            self._ack(evals, f"{type(exc).__name__}: {exc}"[:500])
            return len(train)
        completed = [self.evaluation.add(ScoredRollout(rollout=rollout, teacher_logprobs=logprobs, teacher_index=-1,
                                                       score_s=0.0, policy_version=rollout.policy_version))
                     for (_, rollout), logprobs in zip(evals, scores)]
        self._ack(evals, None)
        for metrics in completed:
            if metrics is not None:
                self.last_eval = metrics
                self.on_eval(metrics)
        return len(train)

    def _ack(self, received: list[tuple[bytes, Rollout]], error: str | None) -> None:
        """One ScoreAckBatch per actor for its rollouts in ``received`` (``error``: not scored)."""
        assert self.rollouts is not None
        for identity, batch in ScoreAckBatch.per_sender(received, error).items():
            self.rollouts.send(batch, identity=identity)

    def wait_batch(self, step: int) -> list[ScoredRollout]:
        stall = _StallTimer(self.cfg.learner.batch_timeout_s)
        started = last_log = time.monotonic()
        while (batch := self.buffer.next_batch(step)) is None:
            stall.check(self.pump(0.05, step), lambda: f"the batch of step {step} ({self._fill(step)})")
            if time.monotonic() - last_log >= self.wait_log_every_s:
                last_log = time.monotonic()
                logger.warning("%s", self.waiting_for(step, last_log - started))
        return batch

    def wait_ready(self, steps: range) -> None:
        """Wait until the batches of ``steps`` are complete, leaving them in the buffer
        (a checkpoint saves them)."""
        stall = _StallTimer(self.cfg.learner.batch_timeout_s)
        for step in steps:
            while not self.buffer.ready(step):
                stall.check(self.pump(0.05, steps.start),
                            lambda: f"the batch of step {step}, to checkpoint it ({self._fill(step)})")

    def _fill(self, step: int) -> str:
        held, _ = self.buffer.snapshot(range(step, step + 1))
        return f"{len(held)} of {self.buffer.batch_size} samples arrived"

    def waiting_for(self, step: int, waited_s: float) -> str:
        """What the batch of ``step`` still lacks, from the buffer and the actors' telemetry."""
        line = (f"waiting {waited_s:.0f}s for the batch of step {step}: buffer has "
                f"{self.buffer.slots_accounted(step)}/{self.buffer.batch_size} of its samples")
        stats = sorted(self.actor_stats.values(), key=lambda s: s.actor_index)
        if not stats:
            return line + "; no actor has reported yet"
        unacked = sum(s.num_unacked for s in stats)
        silent = sorted({t for s in stats for t in s.silent_teachers})
        line += (f"; {unacked} rollouts sent and not yet scored; "
                 f"silent teachers: {', '.join(map(str, silent)) if silent else 'none'}")
        for s in stats:
            if s.teacher_pool:
                line += f"; actor {s.actor_index} (policy version {s.policy_version}): {s.teacher_pool}"
        return line

    def wait_eval(self, version: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.evaluation.pending(version):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"evaluation of policy version {version} did not complete within {timeout_s:g}s. "
                    "Fix: check the actor/teacher logs, or raise teacher.request_timeout_s."
                )
            self.pump(0.05, version)

    def announce(self, update: WeightUpdate) -> None:
        for channel in self.actor_controls:
            channel.send(update)

    def shutdown(self, policy_version: int, reason: str) -> None:
        """Tell every actor and teacher to finish: on its control socket and, in case a
        message is lost with a closing socket, through the rendezvous store."""
        for channel in (*self.actor_controls, *self.teacher_controls):
            channel.send(Shutdown(policy_version=policy_version, reason=reason))
        self.rendezvous.announce_shutdown(reason)

    def actor_metrics(self, previous: dict[int, ActorStats]) -> dict[str, Any]:
        stats = list(self.actor_stats.values())
        if not stats:
            return {}
        rate = 0.0
        for s in stats:
            before = previous.get(s.actor_index)
            if before is not None and s.wall_s > before.wall_s:
                rate += (s.tokens_generated - before.tokens_generated) / (s.wall_s - before.wall_s)
        return {
            "actor/tokens_per_s": rate,
            "actor/tokens_generated": sum(s.tokens_generated for s in stats),
            "actor/engine_busy_s": max(s.engine_busy_s for s in stats),
            "actor/weight_sync_s": max(s.weight_sync_s for s in stats),
            "actor/retries": sum(s.num_retries for s in stats),
            "actor/rollouts_unscored": sum(s.num_unscored for s in stats),
            "actor/rejected_messages": sum(s.num_rejected_messages for s in stats),
            "actor/teacher_failovers": sum(s.num_teacher_failovers for s in stats),
            "actor/teacher_rejoins": sum(s.num_teacher_rejoins for s in stats),
            "actor/silent_teachers": len({t for s in stats for t in s.silent_teachers}),
            "actor/policy_version_min": min(s.policy_version for s in stats),
        }

    def close(self) -> None:
        self.inbox.close()
        if self.rollouts is not None:
            self.rollouts.close()
        for channel in (*self.actor_controls, *self.teacher_controls):
            channel.close(linger_s=2.0)  # let a queued Shutdown leave


class _StallTimer:
    """Fails a wait once ``timeout_s`` pass without a scored rollout arriving."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.last_progress = time.monotonic()

    def check(self, num_arrived: int, waiting_for: Callable[[], str]) -> None:
        now = time.monotonic()
        if num_arrived:
            self.last_progress = now
        elif now - self.last_progress > self.timeout_s:
            raise TimeoutError(
                f"learner: waited learner.batch_timeout_s={self.timeout_s:g}s for {waiting_for()} with no scored "
                "rollout arriving. An actor or teacher is stalled or gone (see their logs). Fix: restart the job "
                "(learner.resume=auto continues from the last checkpoint), or raise learner.batch_timeout_s "
                "for very slow scoring.")
