"""A teacher-pool worker: receives rollouts, scores them, forwards the scores.

Data flow (one direction)::

    actor DEALER ──RolloutBatch──> ROUTER [this worker] ──ScoredBatch──> PUSH ─> learner inbox
                 <─ScoreAckBatch──

The worker drains everything queued on its ROUTER (up to the token budget, so
batching follows load without adding latency), scores it in one or more
forwards and, per forward, sends the learner one :class:`ScoredBatch` (with the
top-k support when teacher.top_k > 0), then each actor one :class:`ScoreAckBatch`
acknowledging its rollouts of that forward. A rollout that fails to score is
acknowledged with ``ok=False`` so the actor can retry it elsewhere; the worker
keeps serving. A lone :class:`Rollout` (an older actor) is taken as a batch of one.
A :class:`Heartbeat` is echoed at once (between forwards), which is how actors tell
a busy teacher from a dead or frozen one. It exits on
:class:`Shutdown` from the learner. Before serving, rank 0 samples the evaluation's
teacher references (:mod:`asyncopd.teacher.references`).
"""

from __future__ import annotations

import logging
import time

import zmq

from asyncopd import trace
from asyncopd.config import JobConfig
from asyncopd.teacher.references import publish_references
from asyncopd.placement import Placement, limit_gpu_memory
from asyncopd.teacher.scorer import HFScorer, Scorer, split_by_token_budget
from asyncopd.transport.discovery import Rendezvous, ShutdownWatch
from asyncopd.transport.sockets import Channel, poll
from asyncopd.types import (Heartbeat, Rollout, RolloutBatch, ScoreAckBatch, ScoredBatch, ScoredRollout,
                            Shutdown)

__all__ = ["TeacherWorker", "run_teacher"]

logger = logging.getLogger(__name__)


class TeacherWorker:
    """Serves one scorer on a ROUTER socket."""

    def __init__(self, scorer: Scorer, *, index: int, host: str, max_batch_tokens: int,
                 batch_wait_s: float = 0.0) -> None:
        self.scorer = scorer
        self.index = index
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait_s = batch_wait_s
        self.router = Channel(zmq.ROUTER, bind_host=host)
        self.inbox = Channel(zmq.PULL, bind_host=host)
        self.to_learner: Channel | None = None
        self.num_scored = 0
        self.num_failed = 0
        self.num_heartbeats = 0

    def connect_learner(self, address: str) -> None:
        self.to_learner = Channel(zmq.PUSH, connect=[address])

    def _drain(self) -> list[tuple[bytes, Rollout]]:
        """What is queued, up to the token budget; with ``batch_wait_s`` > 0, also what
        arrives that much longer (fewer, fuller forwards at a small latency cost)."""
        pending: list[tuple[bytes, Rollout]] = []
        tokens = 0
        deadline = time.monotonic() + self.batch_wait_s
        while tokens < self.max_batch_tokens:
            received = self.router.recv(timeout_s=max(deadline - time.monotonic(), 0.0))
            if received is None:
                break
            identity, message = received
            if isinstance(message, Heartbeat) and identity is not None:
                self.router.send(message, identity=identity)
                self.num_heartbeats += 1
                continue
            if identity is not None and isinstance(message, RolloutBatch):
                rollouts = message.rollouts
            elif identity is not None and isinstance(message, Rollout):  # an older actor: a batch of one
                rollouts = [message]
            else:
                self.router.num_rejected += 1
                logger.warning("teacher %d: ignored a %s on its rollout socket", self.index, type(message).__name__)
                continue
            for rollout in rollouts:
                pending.append((identity, rollout))
                tokens += rollout.num_tokens
        return pending

    def serve_once(self, timeout_s: float = 0.5) -> bool:
        """Handle what arrived within ``timeout_s``; False once told to shut down."""
        for channel in poll([self.router, self.inbox], timeout_s):
            if channel is self.inbox:
                received = self.inbox.recv(timeout_s=0.0)
                if received is not None and isinstance(received[1], Shutdown):
                    logger.info("teacher %d: shutdown (%s)", self.index, received[1].reason)
                    return False
            else:
                self._score(self._drain())
        return True

    def _score(self, pending: list[tuple[bytes, Rollout]]) -> None:
        assert self.to_learner is not None, "connect_learner() first"
        sender = {r.rollout_id: identity for identity, r in pending}
        for group in split_by_token_budget([r for _, r in pending], self.max_batch_tokens):
            start = time.perf_counter()
            try:
                with trace.span("score", rollouts=len(group)):
                    scores = self.scorer.score(group)
            except Exception as exc:  # a bad batch must not take the pool down
                logger.exception("teacher %d: scoring %d rollouts failed", self.index, len(group))
                self.num_failed += len(group)
                error = f"{type(exc).__name__}: {exc}"[:500]
                self._acknowledge(sender, group, error)
                continue
            seconds = time.perf_counter() - start
            group_tokens = sum(r.num_tokens for r in group)
            self.to_learner.send(ScoredBatch.of([
                ScoredRollout(rollout=r, teacher_logprobs=score.logprobs, teacher_index=self.index,
                              score_s=seconds * r.num_tokens / group_tokens, policy_version=r.policy_version,
                              topk_ids=score.topk_ids, topk_logprobs=score.topk_logprobs)
                for r, score in zip(group, scores)]))
            self._acknowledge(sender, group, None)  # after the scores left: an ack means "on its way"
            self.num_scored += len(group)

    def _acknowledge(self, sender: dict[str, bytes], group: list[Rollout], error: str | None) -> None:
        """One ScoreAckBatch per actor for its rollouts in ``group`` (``error``: not scored)."""
        for identity, batch in ScoreAckBatch.per_sender(((sender[r.rollout_id], r) for r in group), error).items():
            self.router.send(batch, identity=identity)

    def close(self) -> None:
        for channel in (self.router, self.inbox, self.to_learner):
            if channel is not None:
                channel.close()


def run_teacher(cfg: JobConfig, index: int, rendezvous: Rendezvous, teacher_path: str | None,
                student_path: str | None = None, *, placement: Placement | None = None) -> None:
    """The teacher role's main: bind, publish, connect, serve until shutdown.
    ``teacher_path``: the local teacher model (None with teacher.backend=vllm_http);
    ``student_path``: whose tokenizer encodes the held-out prompts for the teacher's
    evaluation references (rank 0 samples them before the roles connect).
    ``placement``: the job's device plan (None: CPU)."""
    scorer: Scorer
    me = None if placement is None else placement.for_rank(cfg.cluster.learners + cfg.cluster.actors + index)
    if cfg.teacher.backend == "vllm":
        from asyncopd.teacher.vllm_scorer import VllmScorer

        assert teacher_path is not None, "the vllm backend scores with a local model"
        scorer = VllmScorer(teacher_path, dtype=cfg.model.teacher.dtype, top_k=cfg.teacher.top_k,
                            max_model_len=cfg.actor.max_model_len + 1, kv_cache_gib=cfg.teacher.kv_cache_gib,
                            enforce_eager=cfg.actor.enforce_eager, placement=me)
        max_batch_tokens = cfg.teacher.max_batch_tokens
    elif cfg.teacher.backend == "vllm_http":
        from asyncopd.teacher.http import HttpScorer

        scorer = HttpScorer.from_config(cfg.teacher, startup_timeout_s=cfg.cluster.startup_timeout_s)
        # The scorer splits each batch into requests of max_batch_tokens and keeps
        # http_concurrency of them in flight, so the worker hands it that many at once.
        max_batch_tokens = cfg.teacher.max_batch_tokens * cfg.teacher.http_concurrency
    else:
        assert teacher_path is not None, "the hf backend scores with a local model"
        device = None if me is None else me.device
        if me is not None:
            limit_gpu_memory(me.device, me.memory_fraction, role="teacher")
        if cfg.teacher.supervise_scorer:  # the child process runs on the CPU (a GPU scorer: not yet)
            from asyncopd.teacher.supervised import HFScorerFactory, SupervisedScorer

            factory = HFScorerFactory(teacher_path, cfg.model.teacher.dtype, cfg.teacher.top_k,
                                      cfg.cluster.teacher_threads)
            scorer = SupervisedScorer(factory, timeout_s=cfg.teacher.request_timeout_s,
                                      startup_timeout_s=cfg.cluster.startup_timeout_s)
        else:
            scorer = HFScorer(teacher_path, dtype=cfg.model.teacher.dtype, top_k=cfg.teacher.top_k, device=device)
        max_batch_tokens = cfg.teacher.max_batch_tokens
    worker = TeacherWorker(scorer, index=index, host=cfg.cluster.host, max_batch_tokens=max_batch_tokens,
                           batch_wait_s=cfg.teacher.batch_wait_s)
    try:
        rendezvous.publish(f"teacher/{index}/router", worker.router.address)
        rendezvous.publish(f"teacher/{index}/inbox", worker.inbox.address)
        worker.connect_learner(rendezvous.lookup("learner/inbox"))
        if index == 0 and cfg.eval.enabled:
            publish_references(cfg, rendezvous, scorer, student_path or teacher_path)
        rendezvous.barrier("connected")
        logger.info("teacher %d: serving on %s", index, worker.router.address)
        ended = ShutdownWatch(rendezvous)  # should the Shutdown message be lost
        while worker.serve_once() and not ended():
            pass
        logger.info("teacher %d: scored %d rollouts, %d failed", index, worker.num_scored, worker.num_failed)
    finally:
        worker.close()
        if hasattr(scorer, "close"):
            scorer.close()
