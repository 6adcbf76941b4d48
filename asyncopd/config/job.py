"""The whole job (:class:`JobConfig`, its cross-group checks) and :func:`from_dict`.

Part of :mod:`asyncopd.config` (import from there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgspec

# Every group class, nested ones (ModelSpec) included: _reject_unknown looks them up in globals().
from asyncopd.config._base import ConfigError, _fail
from asyncopd.config.actor import ActorConfig
from asyncopd.config.cluster import ClusterConfig
from asyncopd.config.learner import AsyncConfig, BufferConfig, LearnerConfig, LossConfig
from asyncopd.config.model import ModelConfig, ModelSpec, TaskConfig
from asyncopd.config.run import EvalConfig, RunConfig
from asyncopd.config.teacher import DEFAULT_TOP_K, TeacherConfig


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
