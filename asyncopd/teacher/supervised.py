"""A teacher rank's scorer in a supervised child process (teacher.supervise_scorer=true).

::

    TeacherWorker ─score(rollouts)─> SupervisedScorer ══ pipe (msgpack) ══> child process: scorer.score
                  <─scores, or ScorerRestarted─┘

A crash of the model code (the OOM killer, a segfault, a CUDA error that takes the
process down) or a forward that hangs past ``timeout_s`` ends only the child: it is
killed if need be and started again, and the batch it held fails with
:class:`ScorerRestarted`, which the worker acknowledges as failed so that actors
resend those rollouts (to another teacher when one is healthy). An exception raised
by the scorer in the child is passed back as a :class:`ScorerError` and the child
keeps serving. A child that cannot start (or dies ``max_restarts`` times within
``restart_window_s``) ends the job: a crash loop is not a fault worth surviving.

Rollouts and scores cross the pipe in the wire encoding (msgpack), never pickle. The
child is started with ``spawn`` and inherits this process's environment (the device
it was given). This module loads no model itself; the factory does, in the child.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

import msgspec
import numpy as np

from asyncopd.teacher.scorer import Scorer, TeacherScore
from asyncopd.transport.codec import decode_value, encode_value
from asyncopd.types import Rollout

__all__ = ["SupervisedScorer", "ScorerRestarted", "ScorerError", "HFScorerFactory"]

logger = logging.getLogger(__name__)


class ScorerRestarted(RuntimeError):
    """The scorer process died or hung on this batch and was restarted."""


class ScorerError(RuntimeError):
    """The scorer raised in its process (the process lives on)."""


class _Scores(msgspec.Struct, array_like=True):
    logprobs: list[np.ndarray]
    topk_ids: list[np.ndarray | None]
    topk_logprobs: list[np.ndarray | None]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class HFScorerFactory:
    """Builds the HF scorer inside the child (a picklable recipe, not a model)."""

    path: str
    dtype: str
    top_k: int
    threads: int = 1

    def __call__(self) -> Scorer:
        import torch

        from asyncopd.teacher.scorer import HFScorer

        torch.set_num_threads(self.threads)
        return HFScorer(self.path, dtype=self.dtype, top_k=self.top_k)


def _serve(conn: Connection, factory: Callable[[], Scorer]) -> None:
    """The child's loop: build the scorer, then answer every batch until the pipe closes."""
    scorer = factory()
    conn.send_bytes(b"ready")
    while True:
        try:
            request = conn.recv_bytes()
        except EOFError:
            return
        rollouts = decode_value(request, list[Rollout])
        try:
            scores = scorer.score(rollouts)
            reply = _Scores([s.logprobs for s in scores], [s.topk_ids for s in scores],
                            [s.topk_logprobs for s in scores])
        except Exception as exc:  # passed back; a bad batch must not end the scorer
            reply = _Scores([], [], [], error=f"{type(exc).__name__}: {exc}"[:2000])
        conn.send_bytes(encode_value(reply))


class SupervisedScorer:
    """A :class:`Scorer` whose ``score`` runs in a child process that is restarted on a crash."""

    def __init__(self, factory: Callable[[], Scorer], *, timeout_s: float, startup_timeout_s: float,
                 max_restarts: int = 5, restart_window_s: float = 600.0) -> None:
        self.factory = factory
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self.num_restarts = 0
        self._restarts: list[float] = []
        self._ctx = mp.get_context("spawn")
        self._process: mp.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._start()

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._process = self._ctx.Process(target=_serve, args=(child, self.factory), daemon=True,
                                          name="asyncopd-scorer")
        self._process.start()
        child.close()
        self._conn = parent
        if not parent.poll(self.startup_timeout_s) or self._recv_or_none() != b"ready":
            code = self._stop()
            raise RuntimeError(f"the supervised teacher scorer did not start (exit code {code}) within "
                               f"cluster.startup_timeout_s={self.startup_timeout_s:g}s; see its traceback above. "
                               "Fix: the model directory and device settings, or teacher.supervise_scorer=false "
                               "to load it in the teacher rank itself.")

    def _recv_or_none(self) -> bytes | None:
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError):
            return None

    def _stop(self) -> int | None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(timeout=30)
            return self._process.exitcode
        return None

    def _restart(self, why: str) -> ScorerRestarted:
        code = self._stop()
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < self.restart_window_s] + [now]
        self.num_restarts += 1
        if len(self._restarts) > self.max_restarts:
            raise RuntimeError(f"the supervised teacher scorer failed {len(self._restarts)} times within "
                               f"{self.restart_window_s:g}s (last: {why}, exit code {code}); giving up. Fix: see "
                               "its tracebacks above (out of memory? lower teacher.max_batch_tokens).")
        logger.warning("teacher scorer process %s (exit code %s); restarting it (%d restarts so far)", why, code,
                       self.num_restarts)
        self._start()
        return ScorerRestarted(f"the scorer process {why} (exit code {code}) and was restarted")

    def score(self, rollouts: Sequence[Rollout]) -> list[TeacherScore]:
        assert self._conn is not None and self._process is not None
        try:
            self._conn.send_bytes(encode_value(list(rollouts)))
        except (BrokenPipeError, OSError):
            raise self._restart("died between batches") from None
        if not self._conn.poll(self.timeout_s):
            raise self._restart(f"gave no answer within teacher.request_timeout_s={self.timeout_s:g}s")
        data = self._recv_or_none()
        if data is None:
            raise self._restart("died while scoring")
        reply = decode_value(data, _Scores)
        if reply.error is not None:
            raise ScorerError(reply.error)
        return [TeacherScore(logprobs=lp, topk_ids=ids, topk_logprobs=tlp)
                for lp, ids, tlp in zip(reply.logprobs, reply.topk_ids, reply.topk_logprobs)]

    def close(self) -> None:
        self._stop()
