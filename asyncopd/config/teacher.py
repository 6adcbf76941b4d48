"""``teacher``: how rollouts are scored (backend, top-k, servers).

Part of :mod:`asyncopd.config` (import from there).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

from asyncopd.config._base import _check_fraction, _check_positive, _fail


DEFAULT_TOP_K = 16
"""teacher.top_k when unset and the objective resolves to loss.kl_loss=topk: on the demo
the top-16 reverse KL learned as fast per step as the exact full-vocabulary KL
(bench/results/objectives.txt), and 16 fits vLLM servers' default --max-logprobs of 20."""


MAX_TOP_K = 256
"""Largest teacher.top_k. Each response token then carries 2k ids and 2k log-probs on the
wire (8 bytes each), and the actor reads k+1 log-prob entries per generated token out of
vLLM in Python (on a tiny model k=8 is within noise of k=0, k=64 costs up to a quarter of
the actor's tokens/s); beyond a few hundred candidates the top-k KL's tail bucket holds
little mass."""


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(kw_only=True, slots=True)
class TeacherConfig:
    """The teacher pool: how rollouts are scored."""

    backend: Literal["hf", "vllm", "vllm_http", "colocated"] = "hf"
    """Scoring backend. "hf": each teacher rank loads model.teacher.path and runs a
    transformers forward over prompt+response. "vllm_http": each teacher rank is a
    client of an OpenAI-compatible vLLM server (``vllm serve <teacher>``, anywhere
    reachable) at teacher.url and scores with ``prompt_logprobs``; no model is loaded
    here (see asyncopd/teacher/http.py). "colocated": no teacher ranks
    (cluster.teachers=0); every learner rank holds a frozen replica of
    model.teacher.path and scores each micro-batch inside the train step, from the
    teacher's whole next-token distribution (what loss.kl_loss=full needs); actors
    send rollouts to learner rank 0, which also scores the held-out evaluation
    rollouts (see asyncopd/learner/teacher.py). The teacher must fit on every learner
    device beside the student. "vllm": each teacher rank runs an in-process
    vLLM engine on model.teacher.path and scores by ``prompt_logprobs``
    (asyncopd/teacher/vllm_scorer.py; also on vLLM's CPU build)."""
    max_batch_tokens: int = 8192
    """Token budget of one scoring forward (prompt+response tokens, padded)."""
    batch_wait_s: float = 0.0
    """Seconds a teacher keeps collecting rollouts after the first arrives, before
    scoring (up to max_batch_tokens): fewer, fuller forwards for a little latency."""
    request_timeout_s: float = 120.0
    """Seconds an actor waits for a rollout's score acknowledgement before resending
    it (to another teacher when one is healthy)."""
    max_retries: int = 2
    """Resends of one rollout before the on_failure policy applies."""
    on_failure: Literal["drop", "fail"] = "drop"
    """What happens to a rollout no teacher scored: "drop" counts it
    (actor/rollouts_unscored) and samples its slot again; "fail" stops the job."""
    heartbeat_interval_s: float = 2.0
    """Seconds between the heartbeats each actor sends each teacher (answered between
    scoring batches), so a dead or hung teacher is noticed even when idle."""
    silence_timeout_s: float = 30.0
    """Seconds a teacher may leave a rollout or heartbeat unanswered, hearing nothing
    back at all, before actors mark it unhealthy: it gets no new work and its
    outstanding rollouts go to other teachers at once (counted in
    actor/teacher_failovers). It rejoins with its next answer. Must exceed the longest
    scoring forward (one batch of max_batch_tokens). Not used with backend="colocated"
    (the teacher is the learner, silent for whole training steps, with no peer to take
    its work; its rollouts still have request_timeout_s)."""
    supervise_scorer: bool = False
    """backend="hf": run each teacher rank's model in a child process that is started
    again when it crashes (out of memory, a CUDA error) or hangs past
    request_timeout_s, instead of ending the job; the batch it held is resent by the
    actors. Costs a copy of each batch through a pipe and the child's start-up."""
    top_k: int | None = None
    """Top-k distillation width k (0 = off). None: DEFAULT_TOP_K (16) when the objective
    resolves to loss.kl_loss=topk (the default with teacher ranks or a server), else 0
    (decided once, in JobConfig). With k > 0 each actor records the
    behaviour distribution's k most likely ids per generated token (vLLM
    ``logprobs=k``; the engine's ``max_logprobs`` is raised to k), and the teacher
    returns, per response token, its own top-k ids followed by the student's ids it
    lacks, padded with -1 to 2k, with its log-prob of each (the top-k reverse KL's
    support). At most MAX_TOP_K and at most the vocabulary size. With
    backend="vllm_http" the server reports only its own top-k (plus the sampled token),
    so the student's ids it lacks are dropped (-1 padding); the server must run with
    ``--max-logprobs`` >= k."""
    url: str | list[str] | None = None
    """backend="vllm_http": the server's OpenAI base URL, e.g. "http://host:8000/v1"
    (completions go to <url>/completions; the tokenizer check uses <url without
    /v1>/tokenize), or a list of such URLs (``teacher.url=[http://a:8000/v1,http://b:8000/v1]``),
    servers of the same teacher: each request goes to the healthy server with the fewest
    requests in flight, a server that fails is skipped (the request goes to another at
    once) and probed every few seconds until it answers again. Required with
    vllm_http, must be unset with hf."""
    served_model: str | None = None
    """backend="vllm_http": the model name to request (vllm serve
    --served-model-name). None: the server's only model (GET <url>/models)."""
    tokenizer: str | None = None
    """backend="vllm_http": a local directory (or hub id) with the served teacher's
    tokenizer, compared exactly with the student's at start-up. None: the check asks
    the server instead (its /tokenize of a probe text drawn from the student's
    vocabulary must equal the student's tokenization)."""
    http_timeout_s: float = 60.0
    """backend="vllm_http": seconds one scoring request may take (connect + prefill +
    answer) before it counts as failed and is retried; at most request_timeout_s."""
    http_concurrency: int = 4
    """backend="vllm_http": scoring requests each teacher rank keeps in flight (each
    holds up to max_batch_tokens prompt+response tokens of several rollouts)."""
    http_max_retries: int = 3
    """backend="vllm_http": resends of a request after a connection error, a timeout
    or a 5xx/429 answer (backoff 0.5 s, 1 s, 2 s, ...); a 4xx answer is not retried."""
    api_key_env: str | None = None
    """backend="vllm_http": the name of an environment variable (on the teacher ranks'
    nodes) holding the server's API key (``vllm serve --api-key``), sent as
    ``Authorization: Bearer <key>``. The key itself never enters the config, so it is not
    written to the run directory. None: no credentials are sent."""
    gpu_memory_utilization: float | None = None
    """On GPU: the fraction (0, 1] of its GPU's memory a teacher rank may take (vLLM's
    ``gpu_memory_utilization`` with backend=vllm; a caching-allocator cap with hf).
    None: 0.9 on a GPU of its own, an equal share of 0.9 on a shared GPU."""
    kv_cache_gib: float = 0.25
    """backend=vllm on the CPU: KV-cache memory of the teacher's engine in GiB (on GPU
    it is sized from teacher.gpu_memory_utilization)."""

    def __post_init__(self) -> None:
        _check_positive("teacher", self, "max_batch_tokens", "request_timeout_s", "heartbeat_interval_s",
                        "silence_timeout_s", "kv_cache_gib")
        _check_fraction("teacher.gpu_memory_utilization", self.gpu_memory_utilization)
        _check_positive("teacher", self, "batch_wait_s", allow_zero=True)
        _check_positive("teacher", self, "max_retries", "top_k", allow_zero=True)
        _check_positive("teacher", self, "http_timeout_s", "http_concurrency")
        _check_positive("teacher", self, "http_max_retries", allow_zero=True)
        self._check_backend()
        if self.silence_timeout_s <= self.heartbeat_interval_s:
            _fail("teacher.silence_timeout_s", self.silence_timeout_s,
                  f"does not exceed teacher.heartbeat_interval_s={self.heartbeat_interval_s}: every teacher would "
                  "look silent between two heartbeats",
                  "use a silence timeout of several heartbeat intervals (defaults: 30 and 2)")
        if self.top_k is not None and self.top_k > MAX_TOP_K:
            _fail(
                "teacher.top_k", self.top_k,
                f"exceeds the cap of {MAX_TOP_K} (every response token would carry {2 * self.top_k} ids and "
                f"log-probs on the wire, and the actor would read {self.top_k + 1} log-prob entries per generated token)",
                f"use teacher.top_k <= {MAX_TOP_K}; the tail bucket of the top-k KL covers the remaining mass "
                "(the actor sets vLLM's max_logprobs to teacher.top_k, so vLLM's own default cap of 20 "
                "does not apply)",
            )

    @property
    def urls(self) -> list[str]:
        """teacher.url as a list (empty when unset)."""
        if self.url is None:
            return []
        return [self.url] if isinstance(self.url, str) else list(self.url)

    def _check_backend(self) -> None:
        http_fields = ("url", "served_model", "tokenizer", "api_key_env")
        if self.backend in ("hf", "vllm", "colocated"):
            for name in http_fields:
                if getattr(self, name) is not None:
                    _fail(f"teacher.{name}", getattr(self, name), "is used only by teacher.backend=vllm_http",
                          f"set teacher.backend=vllm_http to score on that server, or remove teacher.{name}")
            if self.backend == "colocated" and self.top_k:
                _fail("teacher.top_k", self.top_k,
                      "teacher.backend=colocated has the teacher's whole distribution in the learner, so no "
                      "top-k travels", "set teacher.top_k=0 and use loss.kl_loss=full (the exact reverse KL)")
            return
        if self.url is None:
            _fail("teacher.url", None, "teacher.backend=vllm_http needs the server's address",
                  "start `vllm serve <teacher>` and set teacher.url=http://<host>:<port>/v1")
        if self.api_key_env is not None and not _ENV_NAME.fullmatch(self.api_key_env):
            _fail("teacher.api_key_env", self.api_key_env, "is not an environment variable name (it names the "
                  "variable holding the key, it is not the key)",
                  "export TEACHER_API_KEY=<key> and set teacher.api_key_env=TEACHER_API_KEY")
        if self.supervise_scorer:
            _fail("teacher.supervise_scorer", True, "supervises a model loaded by the teacher rank (backend=hf); "
                  "with vllm_http the model lives in the server", "drop teacher.supervise_scorer")
        if not self.urls:
            _fail("teacher.url", self.url, "is an empty list",
                  "give at least one server, e.g. teacher.url=http://127.0.0.1:8000/v1")
        for url in self.urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                _fail("teacher.url", url, "is not an http(s) URL",
                      "use the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1")
        if self.http_timeout_s > self.request_timeout_s:
            _fail("teacher.http_timeout_s", self.http_timeout_s,
                  f"exceeds teacher.request_timeout_s={self.request_timeout_s}: actors would resend a rollout "
                  "while its scoring request is still running",
                  "lower teacher.http_timeout_s or raise teacher.request_timeout_s")
