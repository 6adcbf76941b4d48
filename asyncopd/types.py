"""Every message that crosses a process boundary, and nothing else.

Messages are ``msgspec.Struct``s in one tagged union, :data:`Message`, encoded as
msgpack by :mod:`asyncopd.transport.codec`. Token ids and log-probs travel as
compact numpy arrays (a msgpack extension holding dtype + raw bytes), never as
pickle. Every message carries ``policy_version``.

Invariants checked on construction *and* on decode (``__post_init__``):

- all per-token arrays of a :class:`Rollout` share the length of ``response_ids``;
- ``policy_version == min(token_policy_versions)`` (the oldest weights that
  produced any of its tokens), so staleness is ``learner_version - policy_version``;
- a :class:`ScoredRollout`'s teacher arrays match its rollout's response length;
- top-k arrays are 2-d with one row per response token: ``Rollout.student_topk_ids``
  [n, k] (distinct ids >= 0 per row), ``ScoredRollout.topk_ids`` / ``topk_logprobs``
  [n, 2k] together or not at all, ids -1 only as padding at the end of a row;
- a batch's ``policy_version`` is the minimum of its elements' (0 when empty).

A message that breaks them is rejected by the decoder like any foreign bytes; inside a
batch (:class:`RolloutBatch`, :class:`ScoreAckBatch`, :class:`ScoredBatch`: the
messages of one engine step or one scoring forward, sent as one frame) only the broken
elements are dropped and counted, their neighbours are kept.

The checks run once per message on the hot path (tens of thousands a minute on a busy
job), so they compare dtypes by identity first and take small minima in Python. The two
hot batches travel in columns (:mod:`asyncopd.transport.columns`), whose decoder checks
the same invariants once per batch, vectorised, and builds the elements with
:func:`build_checked` instead of running these checks again per element.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, Literal, Union

import msgspec
import numpy as np

__all__ = [
    "Rollout",
    "RolloutBatch",
    "ScoredRollout",
    "ScoredBatch",
    "ScoreAck",
    "ScoreAckBatch",
    "TensorSpec",
    "WeightUpdate",
    "ActorStats",
    "Heartbeat",
    "Shutdown",
    "TeacherReference",
    "TeacherReferences",
    "Message",
    "ResumePoint",
    "build_checked",
]

RolloutKind = Literal["train", "eval_greedy", "eval_sample", "eval_reference"]


_INT32 = np.dtype(np.int32)
_FLOAT32 = np.dtype(np.float32)
_SMALL = 64
"""Arrays up to this length take their minimum in Python (numpy's reduce costs ~1 us)."""


def _check_array(name: str, array: np.ndarray, dtype: np.dtype, length: int | None, ndim: int = 1) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-d array")
    if array.dtype is not dtype and array.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {array.dtype}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries, response_ids has {length}")


def _min(array: np.ndarray) -> int:
    """min of a non-empty 1-d int array."""
    return min(array.tolist()) if array.shape[0] <= _SMALL else int(array.min())


def _check_student_topk(ids: np.ndarray, n: int) -> None:
    _check_array("student_topk_ids", ids, _INT32, n, ndim=2)
    if ids.shape[1] == 0:
        raise ValueError("student_topk_ids has no columns; use None when top-k is off")
    if ids.size and int(ids.min()) < 0:
        raise ValueError("student_topk_ids holds negative ids")
    ordered = np.sort(ids, axis=1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ValueError("student_topk_ids repeats an id within a row")


def _check_union_topk(ids: np.ndarray | None, logprobs: np.ndarray | None, n: int,
                      student_k: int | None) -> None:
    if ids is None and logprobs is None:
        return
    if ids is None or logprobs is None:
        raise ValueError("topk_ids and topk_logprobs come together (both or neither)")
    _check_array("topk_ids", ids, _INT32, n, ndim=2)
    _check_array("topk_logprobs", logprobs, _FLOAT32, n, ndim=2)
    width = ids.shape[1]
    if logprobs.shape[1] != width:
        raise ValueError(f"topk_logprobs has {logprobs.shape[1]} columns, topk_ids has {width}")
    if width == 0 or width % 2:
        raise ValueError(f"topk_ids has {width} columns; the union of two top-k sets has 2k (k >= 1)")
    if student_k is not None and width != 2 * student_k:
        raise ValueError(f"topk_ids has {width} columns, the rollout's student_topk_ids has {student_k} (expected 2k)")
    valid = ids >= 0
    if (ids < -1).any() or (valid[:, 1:] & ~valid[:, :-1]).any():
        raise ValueError("topk_ids may hold -1 only as padding at the end of a row")


class Rollout(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """One sampled response, as the actor produced it (actor -> teacher pool)."""

    rollout_id: str
    """Unique per job: "<actor index>-<sequence number>"."""
    kind: RolloutKind
    """"train" feeds the learner; "eval_*" are held-out samples (greedy for accuracy,
    sampled for reverse KL). "eval_reference" is the teacher's own sample of a held-out
    prompt, not sampled but scored by the student (``behaviour_logprobs``: the student's
    teacher-forced log-probs, at T=1) for the NLL of teacher samples."""
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
    student_topk_ids: np.ndarray | None = None
    """int32 [response_len, k]: the k most likely ids of the behaviour distribution at
    each response position, most likely first (k = teacher.top_k); None when top-k
    distillation is off, and for greedy evaluation samples."""
    slot_id: str | None = None
    """The training slot this sample fills when it replaces a dropped sample (the
    dropped one's slot, i.e. the rollout_id of the slot's first sample); None: the slot
    is this rollout's own (``rollout_id``). The buffer keeps one sample per slot, so a
    late original and its resample are never both trained."""

    def __post_init__(self) -> None:
        n = self.response_ids.shape[0] if isinstance(self.response_ids, np.ndarray) else None
        _check_array("prompt_ids", self.prompt_ids, _INT32, None)
        _check_array("response_ids", self.response_ids, _INT32, None)
        _check_array("behaviour_logprobs", self.behaviour_logprobs, _FLOAT32, n)
        _check_array("token_policy_versions", self.token_policy_versions, _INT32, n)
        if self.student_topk_ids is not None:
            _check_student_topk(self.student_topk_ids, n)
        if self.prompt_ids.shape[0] == 0:
            raise ValueError("prompt_ids is empty")
        if n and (oldest := _min(self.token_policy_versions)) != self.policy_version:
            raise ValueError(
                f"policy_version={self.policy_version} differs from min(token_policy_versions)={oldest}"
            )

    @property
    def num_tokens(self) -> int:
        return int(self.prompt_ids.shape[0] + self.response_ids.shape[0])

    @property
    def slot(self) -> str:
        """The training slot this sample fills (see ``slot_id``)."""
        return self.slot_id or self.rollout_id


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
    topk_ids: np.ndarray | None = None
    """int32 [response_len, 2k]: the top-k KL's support at each response position:
    the teacher's k most likely ids (most likely first), then the rollout's
    student_topk_ids not among them, then -1 padding. None when top-k is off."""
    topk_logprobs: np.ndarray | None = None
    """float32 [response_len, 2k]: the teacher's log-prob of each id in topk_ids (0 at padding)."""

    def __post_init__(self) -> None:
        n = self.rollout.response_ids.shape[0]
        _check_array("teacher_logprobs", self.teacher_logprobs, _FLOAT32, n)
        student = self.rollout.student_topk_ids
        _check_union_topk(self.topk_ids, self.topk_logprobs, n, None if student is None else student.shape[1])
        if self.policy_version != self.rollout.policy_version:
            raise ValueError("policy_version differs from the rollout's")

    @property
    def rollout_id(self) -> str:
        return self.rollout.rollout_id

    @property
    def batch_index(self) -> int:
        return self.rollout.batch_index

    @property
    def slot(self) -> str:
        return self.rollout.slot

    @property
    def group_id(self) -> int:
        return self.rollout.group_id


class ScoreAck(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Teacher -> actor: the rollout was scored (and forwarded) or could not be."""

    rollout_id: str
    ok: bool
    policy_version: int
    error: str | None = None


def _check_batch_version(policy_version: int, elements: list) -> None:
    oldest = min([e.policy_version for e in elements], default=0)
    if policy_version != oldest:
        raise ValueError(f"policy_version={policy_version} differs from its elements' minimum {oldest} "
                         "(build batches with .of())")


class RolloutBatch(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Actor -> one teacher: every rollout for that teacher that one engine step finished
    (and the retries due in that turn), in one frame. The teacher treats it as that many
    :class:`Rollout` messages; each rollout is acknowledged, retried and failed over on
    its own."""

    policy_version: int
    """min(policy_version) over ``rollouts`` (0 when empty)."""
    rollouts: list[Rollout]

    def __post_init__(self) -> None:
        _check_batch_version(self.policy_version, self.rollouts)

    @classmethod
    def of(cls, rollouts: list[Rollout]) -> RolloutBatch:
        return cls(policy_version=min([r.policy_version for r in rollouts], default=0), rollouts=rollouts)


class ScoreAckBatch(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Teacher -> one actor: the acknowledgements of that actor's rollouts that one
    scoring forward settled (or that a colocated teacher took in one receive), in one frame."""

    policy_version: int
    """min(policy_version) over ``acks`` (0 when empty)."""
    acks: list[ScoreAck]

    def __post_init__(self) -> None:
        _check_batch_version(self.policy_version, self.acks)

    @classmethod
    def of(cls, acks: list[ScoreAck]) -> ScoreAckBatch:
        return cls(policy_version=min([a.policy_version for a in acks], default=0), acks=acks)

    @classmethod
    def per_sender(cls, received: Iterable[tuple[bytes, Rollout]], error: str | None) -> dict[bytes, ScoreAckBatch]:
        """One batch per sender identity acknowledging its rollouts in ``received``:
        scored (``error`` None) or not (``error`` says why)."""
        acks: dict[bytes, list[ScoreAck]] = {}
        for identity, rollout in received:
            acks.setdefault(identity, []).append(ScoreAck(rollout_id=rollout.rollout_id, ok=error is None,
                                                          policy_version=rollout.policy_version, error=error))
        return {identity: cls.of(batch) for identity, batch in acks.items()}


class ScoredBatch(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Teacher -> learner: the scored rollouts of one scoring forward, in one frame."""

    policy_version: int
    """min(policy_version) over ``scored`` (0 when empty)."""
    scored: list[ScoredRollout]

    def __post_init__(self) -> None:
        _check_batch_version(self.policy_version, self.scored)

    @classmethod
    def of(cls, scored: list[ScoredRollout]) -> ScoredBatch:
        return cls(policy_version=min([s.policy_version for s in scored], default=0), scored=scored)


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
    num_unacked: int = 0
    """Rollouts sent to the teacher pool and not yet acknowledged (now)."""
    silent_teachers: list[int] = msgspec.field(default_factory=list)
    """Teachers this actor now routes around (silent longer than teacher.silence_timeout_s)."""
    teacher_pool: str = ""
    """This actor's view of the pool in one line (health, outstanding rollouts, silence)."""
    num_teacher_failovers: int = 0
    """Times a teacher was marked unhealthy and its rollouts were sent to another one."""
    num_teacher_rejoins: int = 0
    """Times an unhealthy teacher answered again and got work again."""


class Heartbeat(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Actor -> teacher, echoed back at once (between scoring batches): the teacher's
    answer shows it is alive even when it has no rollout to acknowledge."""

    policy_version: int
    sent_at: float
    """The sender's monotonic clock when sent (echoed unchanged)."""


class TeacherReference(msgspec.Struct, kw_only=True, frozen=True):
    """The teacher's own sample (T=1) for one held-out prompt."""

    prompt_index: int
    """Position of the prompt in the task's held-out list (Task.eval_prompts())."""
    prompt_ids: np.ndarray
    """int32 [prompt_len]: the prompt as the actors tokenize it."""
    response_ids: np.ndarray
    """int32 [response_len]: the teacher's tokens, its final EOS included when finish_reason is "stop"."""
    finish_reason: str
    """"stop" (EOS sampled) or "length" (actor.max_new_tokens reached)."""

    def __post_init__(self) -> None:
        _check_array("prompt_ids", self.prompt_ids, _INT32, None)
        _check_array("response_ids", self.response_ids, _INT32, None)


class TeacherReferences(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Teacher rank 0 -> actors and learner rank 0, once per job through the rendezvous
    store (key ``eval/teacher_references``): one teacher sample per held-out prompt,
    generated at start-up with a fixed seed. ``references`` is empty, and
    ``skipped_reason`` says why, when the teacher could not generate them."""

    policy_version: int
    """Always 0: the references do not depend on the student."""
    references: list[TeacherReference]
    skipped_reason: str | None = None


class Shutdown(msgspec.Struct, tag=True, kw_only=True, frozen=True):
    """Learner -> every role: the job is over (or failed); finish and exit."""

    policy_version: int
    reason: str


Message = Union[Rollout, RolloutBatch, ScoredRollout, ScoredBatch, ScoreAck, ScoreAckBatch, WeightUpdate,
                ActorStats, Heartbeat, Shutdown, TeacherReferences]
"""The single Rollout / ScoredRollout / ScoreAck are what one batch element is; every
role still accepts them alone (as a batch of one), senders batch."""


class ResumePoint(msgspec.Struct, kw_only=True, frozen=True):
    """Learner rank 0 -> actors, through the rendezvous store (JSON) at start-up:
    where this attempt of the job starts. Not a socket message."""

    policy_version: int
    """The learner's version (steps already trained): 0 on a fresh start."""
    run_start_version: int
    """The version the run first started at (its "before" evaluation)."""
    first_batch: int
    """The first learner step whose samples the actors generate; the samples of steps
    [policy_version, first_batch) were restored from the checkpoint into the buffer."""
    evaluated: list[int] = []
    """Policy versions whose held-out evaluation is already complete (not redone)."""


_TEMPLATES: dict[type, Any] = {}


def build_checked(cls: type, fields: dict[str, Any]) -> Any:
    """A ``cls`` (:class:`Rollout` or :class:`ScoredRollout`) holding ``fields`` (every
    field, by name), built without running its ``__post_init__``.

    Only for a caller that has already checked every invariant of ``__post_init__`` on
    these values: the columnar decoder (:mod:`asyncopd.transport.columns`) checks them
    once per batch, vectorised, where the constructor would check them once per element
    (~6 us each). Anyone else constructs normally."""
    template = _TEMPLATES.get(cls)
    if template is None:
        raise TypeError(f"build_checked builds Rollout or ScoredRollout, not {cls.__name__}")
    message = copy.copy(template)  # msgspec's __copy__: a new struct, no __post_init__
    for name, value in fields.items():
        msgspec.structs.force_setattr(message, name, value)
    return message


def _templates() -> None:
    empty_int, empty_float = np.zeros(0, np.int32), np.zeros(0, np.float32)
    rollout = Rollout(rollout_id="", kind="train", batch_index=0, group_id=0, actor_index=0,
                      prompt_ids=np.zeros(1, np.int32), response_ids=empty_int, behaviour_logprobs=empty_float,
                      token_policy_versions=empty_int, policy_version=0, reward=0.0, finish_reason="")
    _TEMPLATES[Rollout] = rollout
    _TEMPLATES[ScoredRollout] = ScoredRollout(rollout=rollout, teacher_logprobs=empty_float, teacher_index=0,
                                              score_s=0.0, policy_version=0)


_templates()
