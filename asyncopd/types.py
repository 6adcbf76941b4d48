"""Every message that crosses a process boundary, and nothing else.

Messages are ``msgspec.Struct``s in one tagged union, :data:`Message`, encoded as
msgpack by :mod:`asyncopd.transport.codec`. Token ids and log-probs travel as
compact numpy arrays (a msgpack extension holding dtype + raw bytes), never as
pickle. Every message carries ``policy_version``.

Invariants checked on construction *and* on decode (``__post_init__``):

- all per-token arrays of a :class:`Rollout` share the length of ``response_ids``;
- ``policy_version == min(token_policy_versions)`` (the oldest weights that
  produced any of its tokens), so staleness is ``learner_version - policy_version``;
- a :class:`ScoredRollout`'s teacher arrays match its rollout's response length.

A message that breaks them is rejected by the decoder like any foreign bytes.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec
import numpy as np

__all__ = [
    "Rollout",
    "ScoredRollout",
    "ScoreAck",
    "TensorSpec",
    "WeightUpdate",
    "ActorStats",
    "Shutdown",
    "Message",
]

RolloutKind = Literal["train", "eval_greedy", "eval_sample"]


def _check_1d(name: str, array: np.ndarray, dtype: type, length: int | None) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array")
    if array.dtype != np.dtype(dtype):
        raise ValueError(f"{name} must have dtype {np.dtype(dtype)}, got {array.dtype}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries, response_ids has {length}")


class Rollout(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """One sampled response, as the actor produced it (actor -> teacher pool)."""

    rollout_id: str
    """Unique per job: "<actor index>-<sequence number>"."""
    kind: RolloutKind
    """"train" feeds the learner; "eval_*" are held-out samples (greedy for accuracy,
    sampled for reverse KL)."""
    batch_index: int
    """Train: the learner step this sample is generated for. Eval: the policy_version
    under evaluation."""
    group_id: int
    """Samples of one prompt share a group id (GRPO groups)."""
    actor_index: int
    prompt_ids: np.ndarray
    """int32 [prompt_len]."""
    response_ids: np.ndarray
    """int32 [response_len]."""
    behaviour_logprobs: np.ndarray
    """float32 [response_len]: log-prob of each token under the sampling distribution."""
    token_policy_versions: np.ndarray
    """int32 [response_len]: policy_version of the weights that sampled each token."""
    policy_version: int
    """min(token_policy_versions): the oldest weights in this sample."""
    reward: float
    """Task reward from the task's verifier (1.0 = correct)."""
    finish_reason: str
    """"stop" (end of sequence) or "length" (hit max_new_tokens)."""

    def __post_init__(self) -> None:
        n = self.response_ids.shape[0] if isinstance(self.response_ids, np.ndarray) else None
        _check_1d("prompt_ids", self.prompt_ids, np.int32, None)
        _check_1d("response_ids", self.response_ids, np.int32, None)
        _check_1d("behaviour_logprobs", self.behaviour_logprobs, np.float32, n)
        _check_1d("token_policy_versions", self.token_policy_versions, np.int32, n)
        if self.prompt_ids.shape[0] == 0:
            raise ValueError("prompt_ids is empty")
        if n and int(self.token_policy_versions.min()) != self.policy_version:
            raise ValueError(
                f"policy_version={self.policy_version} differs from min(token_policy_versions)="
                f"{int(self.token_policy_versions.min())}"
            )

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_ids.shape[0] + self.response_ids.shape[0])


class ScoredRollout(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """A rollout with the teacher's log-prob of every response token (teacher -> learner)."""

    rollout: Rollout
    teacher_logprobs: np.ndarray
    """float32 [response_len]: log p_teacher(y_t | prompt, y_<t)."""
    teacher_index: int
    score_s: float
    """This rollout's share (by tokens) of the teacher forward that scored it, in
    seconds; summed over a batch it is the teacher time that batch cost."""
    policy_version: int

    def __post_init__(self) -> None:
        _check_1d("teacher_logprobs", self.teacher_logprobs, np.float32, self.rollout.response_ids.shape[0])
        if self.policy_version != self.rollout.policy_version:
            raise ValueError("policy_version differs from the rollout's")

    @property
    def rollout_id(self) -> str:
        return self.rollout.rollout_id

    @property
    def batch_index(self) -> int:
        return self.rollout.batch_index


class ScoreAck(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Teacher -> actor: the rollout was scored (and forwarded) or could not be."""

    rollout_id: str
    ok: bool
    policy_version: int
    error: str | None = None


class TensorSpec(msgspec.Struct, array_like=True, frozen=True):
    """Name, shape and dtype of one tensor inside a weight bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class WeightUpdate(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Learner -> actors: weights of ``policy_version`` follow on the weight group.

    ``buckets[i]`` lists the tensors packed, in order, into the i-th flat buffer
    broadcast from the learner; each bucket holds one dtype.
    """

    policy_version: int
    buckets: list[list[TensorSpec]]


class ActorStats(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Actor -> learner telemetry (cumulative counters since the actor started)."""

    actor_index: int
    policy_version: int
    tokens_generated: int
    engine_busy_s: float
    """Seconds spent inside engine steps."""
    wall_s: float
    weight_sync_s: float
    """Seconds of the last weight update (receive + load into the engine)."""
    num_retries: int
    num_unscored: int
    num_rejected_messages: int


class Shutdown(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Learner -> every role: the job is over (or failed); finish and exit."""

    policy_version: int
    reason: str


Message = Union[Rollout, ScoredRollout, ScoreAck, WeightUpdate, ActorStats, Shutdown]
