"""The columnar wire form of the two hot batches: :class:`~asyncopd.types.RolloutBatch`
(actor -> teacher) and :class:`~asyncopd.types.ScoredBatch` (teacher -> learner).

A batch's per-token arrays travel concatenated, one array per field for the whole batch
(2-d top-k arrays as their raveled rows), with each element's lengths and widths beside
them; scalars travel as one list per field. Decoding then reads ~10 arrays per frame
instead of ~8 per rollout, checks every invariant of :mod:`asyncopd.types` once per
batch with vectorised numpy instead of once per element, and hands each kept element
views into the shared arrays (built with :func:`asyncopd.types.build_checked`).

What is per element stays per element: a rollout whose values break an invariant (an
empty prompt, an unknown kind, a negative or repeated student top-k id, -1 inside a
union row, an odd union width or one that is not twice the student's, a
``policy_version`` that is not the minimum of its tokens' or differs from its
rollout's) is dropped and reported with its position, and its neighbours are kept.
What the layout makes a property of the whole frame (list lengths, column dtypes, lengths
that do not add up to the columns) rejects the frame, as a broken envelope does.

Called by :mod:`asyncopd.transport.codec` only; the roles see the batch types.
"""

from __future__ import annotations

import typing

import msgspec
import numpy as np

from asyncopd.types import Rollout, RolloutBatch, RolloutKind, ScoredBatch, ScoredRollout, build_checked

__all__ = ["RolloutColumns", "ScoredColumns", "rollout_columns", "scored_columns", "rollouts_of", "scored_of"]

_INT32 = np.dtype(np.int32)
_FLOAT32 = np.dtype(np.float32)
_KINDS = frozenset(typing.get_args(RolloutKind))


class RolloutColumns(msgspec.Struct, tag="RolloutColumns", kw_only=True):
    """A :class:`RolloutBatch` in columns: element i's tokens are rows
    ``response_offset[i] : + response_lens[i]`` of the per-token arrays."""

    policy_version: int
    rollout_id: list[str]
    kind: list[str]
    batch_index: list[int]
    group_id: list[int]
    actor_index: list[int]
    policy_versions: list[int]
    reward: list[float]
    finish_reason: list[str]
    slot_id: list[typing.Optional[str]]
    prompt_lens: list[int]
    response_lens: list[int]
    student_k: list[int]
    """Columns of each element's student_topk_ids; 0: None."""
    prompt_ids: np.ndarray
    """int32 [sum prompt_lens]."""
    response_ids: np.ndarray
    """int32 [N = sum response_lens]; so are token_policy_versions, and behaviour_logprobs (float32)."""
    behaviour_logprobs: np.ndarray
    token_policy_versions: np.ndarray
    student_topk_ids: np.ndarray
    """int32 [sum response_lens * student_k]: each element's [n, k] rows, raveled."""


class ScoredColumns(msgspec.Struct, tag="ScoredColumns", kw_only=True):
    """A :class:`ScoredBatch` in columns: its rollouts as :class:`RolloutColumns`, then the scores."""

    policy_version: int
    rollouts: RolloutColumns
    teacher_index: list[int]
    score_s: list[float]
    policy_versions: list[int]
    topk_width: list[int]
    """Columns of each element's topk_ids / topk_logprobs (2k); 0: None."""
    teacher_logprobs: np.ndarray
    """float32 [N]."""
    topk_ids: np.ndarray
    """int32 [sum response_lens * topk_width], raveled rows; topk_logprobs float32 alike."""
    topk_logprobs: np.ndarray


# Every field of an element must have a column: build_checked would keep a template's value.
_ROLLOUT_FIELDS = ("rollout_id", "kind", "batch_index", "group_id", "actor_index", "prompt_ids", "response_ids",
                   "behaviour_logprobs", "token_policy_versions", "policy_version", "reward", "finish_reason",
                   "student_topk_ids", "slot_id")
_SCORED_FIELDS = ("rollout", "teacher_logprobs", "teacher_index", "score_s", "policy_version", "topk_ids",
                  "topk_logprobs")
assert set(_ROLLOUT_FIELDS) == set(Rollout.__struct_fields__), "a Rollout field has no column"
assert set(_SCORED_FIELDS) == set(ScoredRollout.__struct_fields__), "a ScoredRollout field has no column"


# ---- encoding -----------------------------------------------------------------------------------

def _cat(arrays: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype)


def rollout_columns(batch: RolloutBatch) -> RolloutColumns:
    rs = batch.rollouts
    return RolloutColumns(
        policy_version=batch.policy_version,
        rollout_id=[r.rollout_id for r in rs], kind=[r.kind for r in rs], batch_index=[r.batch_index for r in rs],
        group_id=[r.group_id for r in rs], actor_index=[r.actor_index for r in rs],
        policy_versions=[r.policy_version for r in rs], reward=[r.reward for r in rs],
        finish_reason=[r.finish_reason for r in rs], slot_id=[r.slot_id for r in rs],
        prompt_lens=[r.prompt_ids.shape[0] for r in rs], response_lens=[r.response_ids.shape[0] for r in rs],
        student_k=[0 if r.student_topk_ids is None else r.student_topk_ids.shape[1] for r in rs],
        prompt_ids=_cat([r.prompt_ids for r in rs], _INT32),
        response_ids=_cat([r.response_ids for r in rs], _INT32),
        behaviour_logprobs=_cat([r.behaviour_logprobs for r in rs], _FLOAT32),
        token_policy_versions=_cat([r.token_policy_versions for r in rs], _INT32),
        student_topk_ids=_cat([r.student_topk_ids.ravel() for r in rs if r.student_topk_ids is not None], _INT32))


def scored_columns(batch: ScoredBatch) -> ScoredColumns:
    ss = batch.scored
    with_topk = [s for s in ss if s.topk_ids is not None]
    return ScoredColumns(
        policy_version=batch.policy_version,
        rollouts=rollout_columns(RolloutBatch.of([s.rollout for s in ss])),
        teacher_index=[s.teacher_index for s in ss], score_s=[s.score_s for s in ss],
        policy_versions=[s.policy_version for s in ss],
        topk_width=[0 if s.topk_ids is None else s.topk_ids.shape[1] for s in ss],
        teacher_logprobs=_cat([s.teacher_logprobs for s in ss], _FLOAT32),
        topk_ids=_cat([s.topk_ids.ravel() for s in with_topk], _INT32),
        topk_logprobs=_cat([s.topk_logprobs.ravel() for s in with_topk], _FLOAT32))


# ---- decoding: checks once per batch, then views --------------------------------------------------

class _Faults:
    """The first fault of each element (position -> why)."""

    def __init__(self) -> None:
        self.by_element: dict[int, str] = {}

    def add(self, elements, why) -> None:
        for i in np.asarray(elements, dtype=np.int64).tolist():
            self.by_element.setdefault(i, why if isinstance(why, str) else why(i))


def _column(name: str, array, dtype: np.dtype, size: int) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != dtype:
        raise ValueError(f"column {name} must be a 1-d {dtype} array")
    if array.shape[0] != size:
        raise ValueError(f"column {name} has {array.shape[0]} entries, its elements' lengths add up to {size}")


def _lengths(name: str, values: list[int], m: int) -> np.ndarray:
    if len(values) != m:
        raise ValueError(f"column {name} has {len(values)} entries for {m} elements")
    array = np.array(values, dtype=np.int64)
    if m and array.min() < 0:
        raise ValueError(f"column {name} holds a negative length")
    return array


def _offsets(sizes: np.ndarray) -> np.ndarray:
    """Start of each element in a column of concatenated ``sizes``; one more entry: the total."""
    offsets = np.zeros(sizes.shape[0] + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    return offsets


def _rows_by_width(flat: np.ndarray, lengths: np.ndarray, widths: np.ndarray, offsets: np.ndarray):
    """For each width w > 0: (rows [R, w] of the elements with that width, the element of each row)."""
    present = widths > 0
    for width in np.unique(widths[present]).tolist():
        members = np.flatnonzero(widths == width)
        if members.shape[0] == np.count_nonzero(present):  # one width for all: the column as it is
            rows = flat.reshape(-1, width)
        else:
            rows = np.concatenate([flat[offsets[i]:offsets[i + 1]] for i in members.tolist()]).reshape(-1, width)
        yield rows, np.repeat(members, lengths[members])


def _check_rollouts(c: RolloutColumns, faults: _Faults) -> tuple[int, dict[str, np.ndarray]]:
    """Checks the columns (raising ValueError for the frame) and each element (into
    ``faults``); returns the element count and the offsets into each array column."""
    m = len(c.rollout_id)
    for name in ("kind", "batch_index", "group_id", "actor_index", "policy_versions", "reward", "finish_reason",
                 "slot_id"):
        if len(getattr(c, name)) != m:
            raise ValueError(f"column {name} has {len(getattr(c, name))} entries for {m} elements")
    prompt_lens = _lengths("prompt_lens", c.prompt_lens, m)
    n = _lengths("response_lens", c.response_lens, m)
    k = _lengths("student_k", c.student_k, m)
    prompt_at, token_at, student_at = _offsets(prompt_lens), _offsets(n), _offsets(n * k)
    _column("prompt_ids", c.prompt_ids, _INT32, int(prompt_at[-1]))
    for name, dtype in (("response_ids", _INT32), ("behaviour_logprobs", _FLOAT32),
                        ("token_policy_versions", _INT32)):
        _column(name, getattr(c, name), dtype, int(token_at[-1]))
    _column("student_topk_ids", c.student_topk_ids, _INT32, int(student_at[-1]))

    faults.add(np.flatnonzero(prompt_lens == 0), "prompt_ids is empty")
    faults.add([i for i, kind in enumerate(c.kind) if kind not in _KINDS],
               lambda i: f"kind {c.kind[i]!r} is not one of {sorted(_KINDS)}")
    nonempty = np.flatnonzero(n > 0)
    if nonempty.shape[0]:
        oldest = np.minimum.reduceat(c.token_policy_versions, token_at[nonempty])
        versions = np.array(c.policy_versions, np.int64)[nonempty]
        wrong = np.flatnonzero(oldest != versions)
        faults.add(nonempty[wrong], lambda i: (f"policy_version={c.policy_versions[i]} differs from "
                                               f"min(token_policy_versions)="
                                               f"{int(c.token_policy_versions[token_at[i]:token_at[i + 1]].min())}"))
    for rows, owner in _rows_by_width(c.student_topk_ids, n, k, student_at):
        faults.add(np.unique(owner[(rows < 0).any(1)]), "student_topk_ids holds negative ids")
        ordered = np.sort(rows, axis=1)
        faults.add(np.unique(owner[(ordered[:, 1:] == ordered[:, :-1]).any(1)]),
                   "student_topk_ids repeats an id within a row")
    return m, {"prompt": prompt_at, "token": token_at, "student": student_at, "n": n, "k": k}


def _build_rollouts(c: RolloutColumns, at: dict[str, np.ndarray], keep: list[int]) -> dict[int, Rollout]:
    prompt_at, token_at, student_at = (at[key].tolist() for key in ("prompt", "token", "student"))
    ks, ns = at["k"].tolist(), at["n"].tolist()
    built = {}
    for i in keep:
        a, b = token_at[i], token_at[i + 1]
        k = ks[i]
        built[i] = build_checked(Rollout, {
            "rollout_id": c.rollout_id[i], "kind": c.kind[i], "batch_index": c.batch_index[i],
            "group_id": c.group_id[i], "actor_index": c.actor_index[i],
            "prompt_ids": c.prompt_ids[prompt_at[i]:prompt_at[i + 1]], "response_ids": c.response_ids[a:b],
            "behaviour_logprobs": c.behaviour_logprobs[a:b], "token_policy_versions": c.token_policy_versions[a:b],
            "policy_version": c.policy_versions[i], "reward": c.reward[i], "finish_reason": c.finish_reason[i],
            "student_topk_ids": None if k == 0 else c.student_topk_ids[student_at[i]:student_at[i + 1]].reshape(
                ns[i], k),
            "slot_id": c.slot_id[i]})
    return built


def _report(faults: _Faults, where: str, problems: list[str] | None) -> None:
    if problems is not None:
        for i in sorted(faults.by_element):
            problems.append(f"{where}[{i}] dropped: {faults.by_element[i]}")


def rollouts_of(c: RolloutColumns, problems: list[str] | None = None) -> RolloutBatch:
    """The batch in ``c`` without its malformed elements (each reported in ``problems``);
    raises ValueError when the columns themselves are inconsistent."""
    faults = _Faults()
    m, at = _check_rollouts(c, faults)
    keep = [i for i in range(m) if i not in faults.by_element]
    _report(faults, "RolloutBatch.rollouts", problems)
    return RolloutBatch.of(list(_build_rollouts(c, at, keep).values()))


def scored_of(c: ScoredColumns, problems: list[str] | None = None) -> ScoredBatch:
    """The batch in ``c`` without its malformed elements (each reported in ``problems``);
    raises ValueError when the columns themselves are inconsistent."""
    faults = _Faults()
    m, at = _check_rollouts(c.rollouts, faults)
    for name in ("teacher_index", "score_s", "policy_versions"):
        if len(getattr(c, name)) != m:
            raise ValueError(f"column {name} has {len(getattr(c, name))} entries for {m} elements")
    n, k = at["n"], at["k"]
    width = _lengths("topk_width", c.topk_width, m)
    token_at, union_at = at["token"], _offsets(n * width)
    _column("teacher_logprobs", c.teacher_logprobs, _FLOAT32, int(token_at[-1]))
    _column("topk_ids", c.topk_ids, _INT32, int(union_at[-1]))
    _column("topk_logprobs", c.topk_logprobs, _FLOAT32, int(union_at[-1]))

    faults.add(np.flatnonzero(np.array(c.policy_versions, np.int64) != np.array(c.rollouts.policy_versions,
                                                                                 np.int64)),
               "policy_version differs from the rollout's")
    faults.add(np.flatnonzero(width % 2 == 1),
               lambda i: f"topk_ids has {c.topk_width[i]} columns; the union of two top-k sets has 2k (k >= 1)")
    faults.add(np.flatnonzero((width > 0) & (k > 0) & (width != 2 * k)),
               lambda i: (f"topk_ids has {c.topk_width[i]} columns, the rollout's student_topk_ids has "
                          f"{c.rollouts.student_k[i]} (expected 2k)"))
    for rows, owner in _rows_by_width(c.topk_ids, n, width, union_at):
        valid = rows >= 0
        broken = (rows < -1).any(1) | (valid[:, 1:] & ~valid[:, :-1]).any(1)
        faults.add(np.unique(owner[broken]), "topk_ids may hold -1 only as padding at the end of a row")

    keep = [i for i in range(m) if i not in faults.by_element]
    _report(faults, "ScoredBatch.scored", problems)
    rollouts = _build_rollouts(c.rollouts, at, keep)
    token, union, widths = token_at.tolist(), union_at.tolist(), c.topk_width
    ns = n.tolist()
    scored = []
    for i in keep:
        w = widths[i]
        scored.append(build_checked(ScoredRollout, {
            "rollout": rollouts[i], "teacher_logprobs": c.teacher_logprobs[token[i]:token[i + 1]],
            "teacher_index": c.teacher_index[i], "score_s": c.score_s[i], "policy_version": c.policy_versions[i],
            "topk_ids": None if w == 0 else c.topk_ids[union[i]:union[i + 1]].reshape(ns[i], w),
            "topk_logprobs": None if w == 0 else c.topk_logprobs[union[i]:union[i + 1]].reshape(ns[i], w)}))
    return ScoredBatch.of(scored)
