"""Teacher scoring on a remote OpenAI-compatible vLLM server (teacher.backend=vllm_http).

verl, slime and AReaL users keep the teacher behind ``vllm serve <teacher>`` on
another machine; this backend is that server's client. One teacher rank::

    TeacherWorker ──rollouts──> HttpScorer ──POST <url>/completions (up to http_concurrency
                                    │          in flight, each holding several rollouts)──> vLLM
                  <─TeacherScore────┘ <──prompt_logprobs───────────────────────────────────

Every request sends prompt+response as token ids (a list of prompts, one per
rollout), ``max_tokens=1`` (vLLM generates at least one token; it is ignored) and
``prompt_logprobs=k`` (k = teacher.top_k). vLLM answers one dict per prompt position
(the first is null), keyed by token id, holding the actual token's log-prob and,
for k > 0, the teacher's k most likely ids with ``rank`` 1..k.

Top-k and its one difference from :class:`~asyncopd.teacher.scorer.HFScorer`: the
server reports only its own top-k plus the actual token, so the teacher's
log-prob of a *student-only* top-k id is unknown. Those ids are dropped (-1
padding), so the support is the teacher's top-k alone. The top-k reverse KL over
{teacher top-k} + tail bucket is still the exact KL between the two distributions
coarsened to that partition (a lower bound of the full KL, like the union's).
``learner/topk_overlap`` compares the rollout's own student top-k with the teacher's
top-k, so it stays right.

Connection errors, timeouts and 5xx/429 answers are retried with backoff; a 4xx
answer or a malformed body is a :class:`TeacherServerError` that names the URL and
the fix (the worker acks that batch as failed; actors resend it).

Several servers (teacher.url as a list): each request goes to the healthy server
with the fewest requests in flight (:class:`~asyncopd.transport.pool.TeacherPool`
keeps that state). A server whose request fails after its retries (or at once, when
another healthy server exists) is marked unhealthy and the request goes to the next
one; an unhealthy server is probed (GET <url>/models, short timeout) at most every
``_PROBE_EVERY_S`` and rejoins when it answers. Only when every server failed does
the batch fail.

The HTTP client of one server (retries, errors, typed answers) is
:mod:`asyncopd.teacher.server`; its names are re-exported here. This module owns no
sockets of the teacher pool, loads no model and reads no config files;
:func:`check_served_tokenizer` is the launcher's start-up check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from asyncopd.config import TeacherConfig
from asyncopd.teacher.scorer import TeacherScore, check_topk_width
from asyncopd.teacher.server import (PositionLogprobs, TeacherServer, TeacherServerError, TeacherServerRefused,
                                     _Choice, api_key_from_env)
from asyncopd.transport.pool import TeacherPool
from asyncopd.types import Rollout

__all__ = [
    "TeacherServerError",
    "TeacherServerRefused",
    "TeacherServer",
    "HttpScorer",
    "build_completion_request",
    "parse_prompt_logprobs",
    "split_by_request_tokens",
    "check_served_tokenizer",
    "api_key_from_env",
]

logger = logging.getLogger(__name__)

_PROBE_IDS = 2048
"""Vocabulary ids (evenly spaced) decoded into the tokenizer probe text."""
_PROBE_EVERY_S = 5.0
"""How often an unhealthy server of several is probed for its return."""
def build_completion_request(model: str, rollouts: Sequence[Rollout], top_k: int) -> dict[str, Any]:
    """One /completions body scoring every rollout: prompt+response as token ids."""
    prompts = [np.concatenate([r.prompt_ids, r.response_ids]).tolist() for r in rollouts]
    # max_tokens=1: vLLM must generate something; that token is ignored.
    return {"model": model, "prompt": prompts, "max_tokens": 1, "temperature": 1.0, "n": 1,
            "prompt_logprobs": top_k}


def split_by_request_tokens(rollouts: Sequence[Rollout], max_tokens: int) -> list[list[Rollout]]:
    """Consecutive groups of at most ``max_tokens`` prompt+response tokens (the server
    pads nothing); a single over-budget rollout forms its own group."""
    groups: list[list[Rollout]] = []
    tokens = 0
    for rollout in rollouts:
        if not groups or tokens + rollout.num_tokens > max_tokens:
            groups.append([])
            tokens = 0
        groups[-1].append(rollout)
        tokens += rollout.num_tokens
    return groups


def parse_prompt_logprobs(positions: Sequence[PositionLogprobs], rollout: Rollout, top_k: int, *,
                          source: str = "the server") -> TeacherScore:
    """A :class:`TeacherScore` from vLLM's ``prompt_logprobs`` of prompt+response.

    The response span's dicts must hold the actual token and, for ``top_k`` = k > 0,
    ids of rank 1..k (k entries when the actual token is among them, k+1 otherwise).
    """
    start, n = rollout.prompt_ids.shape[0], rollout.response_ids.shape[0]

    def malformed(problem: str) -> TeacherServerError:
        return TeacherServerError(f"{source} answered unusable prompt_logprobs for rollout {rollout.rollout_id}: "
                                  f"{problem}. Fix: point teacher.url at a vLLM OpenAI-compatible server.")

    if len(positions) != start + n:
        raise malformed(f"{len(positions)} positions for {start + n} prompt+response tokens")
    span = positions[start:]
    if any(d is None for d in span):
        raise malformed("a response position has no log-probs")
    counts = np.fromiter((len(d) for d in span), np.int64, n)  # type: ignore[arg-type]
    total = int(counts.sum())
    ids = np.fromiter((i for d in span for i in d), np.int64, total)  # type: ignore[union-attr]
    entries = [e for d in span for e in d.values()]  # type: ignore[union-attr]
    logprobs = np.fromiter((e.logprob for e in entries), np.float64, total)
    row = np.repeat(np.arange(n), counts)  # [total]: the response position of each entry
    is_sampled = ids == rollout.response_ids.astype(np.int64)[row]
    if not (np.bincount(row[is_sampled], minlength=n) == 1).all():
        raise malformed("a response position lacks the log-prob of its own token")
    sampled = logprobs[is_sampled].astype(np.float32)  # rows ascend, so this is response order
    if not top_k:
        return TeacherScore(logprobs=sampled)

    if not np.isin(counts, (top_k, top_k + 1)).all():
        bad = int(counts[~np.isin(counts, (top_k, top_k + 1))][0])
        raise malformed(f"a response position holds {bad} entries, expected teacher.top_k={top_k} or one more "
                        "(is teacher.top_k above the teacher's vocabulary size?)")
    # With k+1 entries the actual token ranks below k: it is not part of the top-k.
    keep = ~(is_sampled & (counts[row] == top_k + 1))
    if any(e.rank is None for e, k in zip(entries, keep) if k):
        raise malformed("a top-k entry has no rank")
    ranks = np.fromiter((e.rank if e.rank is not None else 0 for e in entries), np.int64, total)[keep]
    ranks = ranks.reshape(n, top_k)
    order = np.argsort(ranks, axis=1, kind="stable")
    if not (np.take_along_axis(ranks, order, 1) == np.arange(1, top_k + 1)).all():
        raise malformed(f"the top-k entries do not have ranks 1..{top_k}")
    top_ids = np.take_along_axis(ids[keep].reshape(n, top_k), order, 1)
    top_lps = np.take_along_axis(logprobs[keep].reshape(n, top_k), order, 1)
    # Student-only ids: their teacher log-probs are unknown here, so they are dropped.
    topk_ids = np.concatenate([top_ids, np.full((n, top_k), -1)], axis=1).astype(np.int32)
    topk_logprobs = np.concatenate([top_lps, np.zeros((n, top_k))], axis=1).astype(np.float32)
    return TeacherScore(logprobs=sampled, topk_ids=topk_ids, topk_logprobs=topk_logprobs)


class HttpScorer:
    """A :class:`~asyncopd.teacher.scorer.Scorer` backed by a remote vLLM server."""

    def __init__(self, server: TeacherServer | Sequence[TeacherServer], *, model: str, top_k: int = 0,
                 max_request_tokens: int = 8192, concurrency: int = 4,
                 clock: Any = time.monotonic) -> None:
        """``server``: one server, or several of the same teacher (failover); ``model``:
        the served model name; ``max_request_tokens``: prompt+response tokens per
        request; ``concurrency``: requests in flight."""
        self.servers = [server] if isinstance(server, TeacherServer) else list(server)
        self.server = self.servers[0]
        self.health = TeacherPool(len(self.servers), silence_timeout_s=float("inf"),
                                  heartbeat_interval_s=_PROBE_EVERY_S, clock=clock)
        self._last_probe = [0.0] * len(self.servers)
        self._health_lock = threading.Lock()
        self._num_requests = 0
        self.clock = clock
        self.model = model
        self.top_k = top_k
        self.max_request_tokens = max_request_tokens
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="teacher-http")

    @classmethod
    def from_config(cls, cfg: TeacherConfig, *, startup_timeout_s: float) -> HttpScorer:
        """Connect to teacher.url (the first of them to come up, waiting up to
        ``startup_timeout_s``); servers not up yet join when they answer a probe."""
        servers = [TeacherServer.from_config(cfg, url=url) for url in cfg.urls]
        deadline = time.monotonic() + startup_timeout_s
        while not (up := [s for s in servers if s.probe()]):
            if time.monotonic() > deadline:
                servers[0].wait_until_up(0.0)  # raises with the first server's error and fix
            logger.info("waiting for a teacher server at %s", ", ".join(cfg.urls))
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))
        model = up[0].resolve_model(cfg.served_model).id
        logger.info("scoring with %r at %s (%d requests in flight)", model, ", ".join(s.url for s in up),
                    cfg.http_concurrency)
        scorer = cls(servers, model=model, top_k=cfg.top_k, max_request_tokens=cfg.max_batch_tokens,
                     concurrency=cfg.http_concurrency)
        for j, server in enumerate(servers):
            if server not in up:
                scorer.health.on_failure(j)
                scorer._last_probe[j] = time.monotonic()
        return scorer

    def score(self, rollouts: Sequence[Rollout]) -> list[TeacherScore]:
        for r in rollouts:
            check_topk_width(r, self.top_k)
        groups = split_by_request_tokens(rollouts, self.max_request_tokens)
        futures = [self._pool.submit(self._score_group, group) for group in groups]
        return [score for future in futures for score in future.result()]

    def _score_group(self, rollouts: list[Rollout]) -> list[TeacherScore]:
        choices, server = self._complete(build_completion_request(self.model, rollouts, self.top_k))
        source = f"{server.url}/completions"
        results = []
        for r, choice in zip(rollouts, choices):
            if choice.prompt_logprobs is None:
                raise TeacherServerError(f"{source} answered no prompt_logprobs. Fix: point teacher.url at a vLLM "
                                         "OpenAI-compatible server (it returns them when asked).")
            results.append(parse_prompt_logprobs(choice.prompt_logprobs, r, self.top_k, source=source))
        return results

    def _complete(self, payload: dict[str, Any]) -> tuple[list[_Choice], TeacherServer]:
        """POST the request to the healthy server with the fewest in flight; on failure, to the next."""
        tried: set[int] = set()
        while True:
            with self._health_lock:
                self._probe_due_servers()
                j = self.health.choose(exclude=tried)
                others = [k for k in self.health.healthy() if k != j and k not in tried]
                self._num_requests += 1
                request_key = f"request-{self._num_requests}"
                self.health.on_send(j, request_key)
            server = self.servers[j]
            try:
                # With another healthy server, fail over at once instead of backing off here.
                choices = server.complete(payload, retries=0 if others else None)
            except TeacherServerRefused:
                with self._health_lock:
                    self.health.resolve(request_key)
                raise  # the server is up and says no: another one of the same teacher would too
            except TeacherServerError as exc:
                tried.add(j)
                with self._health_lock:
                    self.health.resolve(request_key)
                    newly = self.health.on_failure(j)
                    self._last_probe[j] = self.clock()
                    left = [k for k in range(len(self.servers)) if k not in tried]
                if not left:
                    raise
                if newly:
                    logger.warning("teacher server %s failed (%s); sending its requests to the other servers and "
                                   "probing it every %.0f s", server.url, exc, _PROBE_EVERY_S)
                continue
            with self._health_lock:
                self.health.on_reply(j, request_key)
            return choices, server

    def _probe_due_servers(self) -> None:
        """Probe unhealthy servers not probed for _PROBE_EVERY_S; the ones that answer rejoin."""
        now = self.clock()
        for j in self.health.silent():
            if now - self._last_probe[j] >= _PROBE_EVERY_S:
                self._last_probe[j] = now
                if self.servers[j].probe():
                    self.health.on_reply(j)
                    logger.warning("teacher server %s answers again; it gets requests again", self.servers[j].url)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for server in self.servers:
            server.close()


def check_served_tokenizer(server: TeacherServer, model: str, student_tokenizer: Any) -> None:
    """Refuse a served teacher whose tokenizer differs from the student's: its
    /tokenize of a probe text (decoded from ids spread over the student's
    vocabulary, plus the EOS token) must equal the student's ids."""
    special = set(student_tokenizer.all_special_ids)
    vocab_size = len(student_tokenizer)
    stride = max(1, vocab_size // _PROBE_IDS)
    text = "".join(student_tokenizer.decode([i]) for i in range(0, vocab_size, stride) if i not in special)
    checks = [("a probe text", text)]
    if student_tokenizer.eos_token is not None:
        checks.append(("the EOS token", student_tokenizer.eos_token))
    for what, probe in checks:
        ours = student_tokenizer(probe, add_special_tokens=False)["input_ids"]
        theirs = server.tokenize(model, probe)
        if ours != theirs:
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            raise TeacherServerError(
                f"the served teacher {model!r} at {server.url} tokenizes {what} differently from the student "
                f"(first difference at token {first}: student {ours[first:first + 5]}, teacher "
                f"{theirs[first:first + 5]}). On-policy distillation scores the student's tokens with the teacher, "
                "so both must share one tokenizer. Fix: serve a teacher from the student's model family.")
