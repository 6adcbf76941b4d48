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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

__all__ = [
    "ConfigError",
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


MAX_TOP_K = 256
"""Largest teacher.top_k. Each response token then carries 2k ids and 2k log-probs on the
wire (8 bytes each), and the actor reads k+1 log-prob entries per generated token out of
vLLM in Python (on a tiny model k=8 is within noise of k=0, k=64 costs up to a quarter of
the actor's tokens/s); beyond a few hundred candidates the top-k KL's tail bucket holds
little mass."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names field, value and fix."""


def _fail(field_name: str, value: Any, problem: str, fix: str) -> None:
    raise ConfigError(f"{field_name}={value!r}: {problem}. Fix: {fix}.")


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
    """Number of teacher-pool ranks, one scorer each."""
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

    def __post_init__(self) -> None:
        _check_positive("cluster", self, "learners", "actors", "teachers")
        _check_positive("cluster", self, "learner_threads", "actor_threads", "teacher_threads")
        _check_positive("cluster", self, "startup_timeout_s")

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

    name: Literal["addition"] = "addition"
    """The task: its prompt generator, its verifier (the reward) and its demo models."""
    max_digits: int = 3
    """Largest number of digits of each operand in the synthetic addition task."""
    train_path: str | None = None
    """A JSONL file of training prompts ({"prompt": str, "answer": str} per line).
    None: the task generates prompts synthetically."""
    eval_path: str | None = None
    """A JSONL file of held-out prompts in the same format. None: synthetic."""
    num_eval_prompts: int = 200
    """Held-out prompts scored before and after training (and every eval.every_steps)."""
    cache_dir: str | None = None
    """Where the demo teacher/student are cached. None: $XDG_CACHE_HOME/asyncopd
    (or ~/.cache/asyncopd)."""
    seed: int = 0
    """Seed of the synthetic prompt stream and held-out set."""

    def __post_init__(self) -> None:
        _check_positive("task", self, "max_digits", "num_eval_prompts")
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

    def __post_init__(self) -> None:
        _check_positive("actor", self, "samples_per_prompt", "max_new_tokens", "max_num_seqs")
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

    backend: Literal["hf"] = "hf"
    """Scoring backend: "hf" runs a transformers forward over prompt+response."""
    max_batch_tokens: int = 8192
    """Token budget of one scoring forward (prompt+response tokens, padded)."""
    request_timeout_s: float = 120.0
    """Seconds an actor waits for a rollout's score acknowledgement before resending
    it (to whichever teacher is next)."""
    max_retries: int = 2
    """Resends of one rollout before the on_failure policy applies."""
    on_failure: Literal["drop", "fail"] = "drop"
    """What happens to a rollout no teacher scored: "drop" counts it
    (actor/rollouts_unscored) and samples its slot again; "fail" stops the job."""
    top_k: int = 0
    """Top-k distillation width k (0 = off). With k > 0 each actor records the
    behaviour distribution's k most likely ids per generated token (vLLM
    ``logprobs=k``; the engine's ``max_logprobs`` is raised to k), and the teacher
    returns, per response token, its own top-k ids followed by the student's ids it
    lacks, padded with -1 to 2k, with its log-prob of each (the top-k reverse KL's
    support). At most MAX_TOP_K and at most the vocabulary size."""

    def __post_init__(self) -> None:
        _check_positive("teacher", self, "max_batch_tokens", "request_timeout_s")
        _check_positive("teacher", self, "max_retries", "top_k", allow_zero=True)
        if self.top_k > MAX_TOP_K:
            _fail(
                "teacher.top_k", self.top_k,
                f"exceeds the cap of {MAX_TOP_K} (every response token would carry {2 * self.top_k} ids and "
                f"log-probs on the wire, and the actor would read {self.top_k + 1} log-prob entries per generated token)",
                f"use teacher.top_k <= {MAX_TOP_K}; the tail bucket of the top-k KL covers the remaining mass "
                "(the actor sets vLLM's max_logprobs to teacher.top_k, so vLLM's own default cap of 20 "
                "does not apply)",
            )


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
    """The per-token objective (see learner/loss.py)."""

    opd_coef: float = 1.0
    """Scale of the OPD advantage A_t = opd_coef * (lp_teacher - lp_old)."""
    importance_correction: Literal["tis", "none"] = "tis"
    """Correction between the actors' behaviour policy and the learner: truncated
    importance sampling (weight min(exp(lp_old - lp_behaviour), tis_cap)) or none."""
    tis_cap: float = 2.0
    """Upper bound C of the truncated importance weight."""
    aggregation: Literal["token-mean"] = "token-mean"
    """How per-token losses become one scalar: the mean over all response tokens of
    the global batch."""

    def __post_init__(self) -> None:
        _check_positive("loss", self, "tis_cap")


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
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    """FSDP2 mixed-precision compute dtype; gradients are reduced in float32."""
    seed: int = 0
    """Seed of the learner (model init where it is random, data order)."""
    checkpoint_every: int | None = None
    """Write a DCP checkpoint every N steps (and at the end); None: only at the end."""
    resume: str | None = None
    """Resume from this checkpoint directory ("latest" = the run's newest one)."""
    export_hf: bool = True
    """Save the final student in Hugging Face format (run_dir/hf) for `vllm serve`."""
    weight_sync_bucket_mb: float = 32.0
    """Size of one weight-broadcast bucket in MiB (tensors are packed into buckets)."""
    weight_sync_timeout_s: float = 300.0
    """A weight sync that has not completed in this many seconds fails the job."""

    def __post_init__(self) -> None:
        _check_positive("learner", self, "num_steps", "batch_size", "lr", "micro_batch_tokens")
        _check_positive("learner", self, "max_grad_norm", "checkpoint_every")
        _check_positive("learner", self, "weight_sync_bucket_mb", "weight_sync_timeout_s")
        _check_positive("learner", self, "weight_decay", allow_zero=True)


@dataclass(kw_only=True, slots=True)
class EvalConfig:
    """Held-out evaluation: greedy accuracy and sampled reverse KL to the teacher."""

    every_steps: int | None = None
    """Also evaluate every N steps; None: only before and after training."""
    enabled: bool = True
    """Evaluate before and after training (the summary's eval/* fields)."""

    def __post_init__(self) -> None:
        _check_positive("eval", self, "every_steps")


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
        self._check_cross_fields()

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
        capacity = self.buffer.capacity
        if capacity is not None and capacity < learner.batch_size * (self.async_.max_staleness + 1):
            need = learner.batch_size * (self.async_.max_staleness + 1)
            _fail(
                "buffer.capacity", capacity,
                f"cannot hold the {self.async_.max_staleness + 1} batches the actors may run ahead",
                f"set buffer.capacity >= {need} (batch_size * (async.max_staleness + 1)) or leave it null",
            )

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
