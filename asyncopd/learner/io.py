"""Everything learner rank 0 does besides computing: its inbox, the buffer, eval
results, actor telemetry, weight announcements and shutdown.

::

    teachers ─ScoredRollout─┐                      ┌─> buffer (train) ─> batch of step k
    actors  ──ActorStats────┴─> PULL inbox ─> route ┼─> EvalAccumulator (eval_*)
                                                    └─> latest ActorStats per actor
    WeightUpdate / Shutdown ─> PUSH to each actor's and teacher's control inbox

The buffer is injected by the launcher (roles do not import each other).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import zmq

from asyncopd.config import JobConfig
from asyncopd.learner.evaluation import EvalAccumulator
from asyncopd.transport.discovery import Rendezvous
from asyncopd.transport.sockets import Channel
from asyncopd.types import ActorStats, ScoredRollout, Shutdown, WeightUpdate

__all__ = ["LearnerIO"]

logger = logging.getLogger(__name__)


class LearnerIO:
    def __init__(self, cfg: JobConfig, rendezvous: Rendezvous, *, buffer, evaluation: EvalAccumulator,
                 on_eval: Callable[[dict[str, float]], None]) -> None:
        self.cfg = cfg
        self.rendezvous = rendezvous
        self.buffer = buffer
        self.evaluation = evaluation
        self.on_eval = on_eval
        self.inbox = Channel(zmq.PULL, bind_host=cfg.cluster.host)
        rendezvous.publish("learner/inbox", self.inbox.address)
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
        received = self.inbox.recv(timeout_s=timeout_s)
        num_scored = 0
        while received is not None:
            message = received[1]
            if isinstance(message, ScoredRollout):
                num_scored += 1
                if message.rollout.kind == "train":
                    self.buffer.put(message, learner_version)
                else:
                    metrics = self.evaluation.add(message)
                    if metrics is not None:
                        self.last_eval = metrics
                        self.on_eval(metrics)
            elif isinstance(message, ActorStats):
                self.actor_stats[message.actor_index] = message
            else:
                self.num_unexpected += 1
                logger.warning("learner inbox: ignored a %s", type(message).__name__)
            received = self.inbox.recv(timeout_s=0.0)
        return num_scored

    def wait_batch(self, step: int) -> list[ScoredRollout]:
        stall = _StallTimer(self.cfg.learner.batch_timeout_s)
        while (batch := self.buffer.next_batch(step)) is None:
            stall.check(self.pump(0.05, step), lambda: f"the batch of step {step} ({self._fill(step)})")
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
            "actor/policy_version_min": min(s.policy_version for s in stats),
        }

    def close(self) -> None:
        self.inbox.close()
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
