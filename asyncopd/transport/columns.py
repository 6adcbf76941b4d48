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

import bisect
import itertools
import typing
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

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
# Per-element bookkeeping (lengths, offsets) is done on Python lists: a frame holds from one to
# a few hundred elements, and numpy's ~1-3 us per call would dominate the small ones. Each
# token-level check is one numpy pass over a column; only a frame with a fault pays for
# finding which element it belongs to.

class _Faults:
    """The first fault of each element (position -> why)."""

    def __init__(self) -> None:
        self.by_element: dict[int, str] = {}

    def add(self, elements: Iterable[int], why: str | Callable[[int], str]) -> None:
        for i in elements:
            self.by_element.setdefault(i, why if isinstance(why, str) else why(i))


def _column(name: str, array: Any, dtype: np.dtype, size: int) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != dtype:
        raise ValueError(f"column {name} must be a 1-d {dtype} array")
    if array.shape[0] != size:
        raise ValueError(f"column {name} has {array.shape[0]} entries, its elements' lengths add up to {size}")


def _same_length(c: Any, names: Iterable[str], m: int) -> None:
    for name in names:
        if len(getattr(c, name)) != m:
            raise ValueError(f"column {name} has {len(getattr(c, name))} entries for {m} elements")


def _offsets(name: str, sizes: list[int]) -> list[int]:
    """Start of each element in a column of concatenated ``sizes``; one more entry: the total."""
    if sizes and min(sizes) < 0:
        raise ValueError(f"column {name} holds a negative length")
    return [0, *itertools.accumulate(sizes)]


def _bad_rows(flat: np.ndarray, lengths: list[int], widths: list[int], offsets: list[int],
              broken: Callable[[np.ndarray], np.ndarray | None]) -> list[int]:
    """The elements (width > 0) with a row of ``flat`` that ``broken`` flags. ``broken``
    takes rows [R, w] and returns a bool [R] mask, or None when no row is broken."""
    bad: list[int] = []
    for width in sorted({w for w in widths if w}):
        members = [i for i, w in enumerate(widths) if w == width]
        if len(members) == sum(1 for w in widths if w):  # one width for all: the column as it is
            rows = flat.reshape(-1, width)
        else:
            rows = np.concatenate([flat[offsets[i]:offsets[i + 1]] for i in members]).reshape(-1, width)
        mask = broken(rows)
        if mask is not None:  # which element each broken row belongs to (rare: only on a fault)
            ends = list(itertools.accumulate(lengths[i] for i in members))
            bad += sorted({members[bisect.bisect_right(ends, row)] for row in np.flatnonzero(mask).tolist()})
    return bad


def _negative_rows(rows: np.ndarray) -> np.ndarray | None:
    return (rows < 0).any(1) if rows.size and rows.min() < 0 else None


def _repeating_rows(rows: np.ndarray) -> np.ndarray | None:
    ordered = np.sort(rows, axis=1)
    repeated = ordered[:, 1:] == ordered[:, :-1]
    return repeated.any(1) if repeated.any() else None


def _misplaced_padding_rows(rows: np.ndarray) -> np.ndarray | None:
    valid = rows >= 0
    broken = valid[:, 1:] & ~valid[:, :-1]
    if rows.size and rows.min() < -1:
        return (rows < -1).any(1) | broken.any(1)
    return broken.any(1) if broken.any() else None


class _Layout(NamedTuple):
    """Where each element's values sit in the array columns."""

    m: int
    n: list[int]
    k: list[int]
    prompt: list[int]
    token: list[int]
    student: list[int]


def _check_rollouts(c: RolloutColumns, faults: _Faults) -> _Layout:
    """Checks the columns (raising ValueError for the whole frame) and each element
    (into ``faults``); returns where each element's values are."""
    m = len(c.rollout_id)
    _same_length(c, ("kind", "batch_index", "group_id", "actor_index", "policy_versions", "reward", "finish_reason",
                     "slot_id", "prompt_lens", "response_lens", "student_k"), m)
    n, k = c.response_lens, c.student_k
    at = _Layout(m, n, k, _offsets("prompt_lens", c.prompt_lens), _offsets("response_lens", n),
                 _offsets("student_k", [a * b for a, b in zip(n, k)]))
    if min(k, default=0) < 0:
        raise ValueError("column student_k holds a negative width")
    _column("prompt_ids", c.prompt_ids, _INT32, at.prompt[-1])
    for name, dtype in (("response_ids", _INT32), ("behaviour_logprobs", _FLOAT32),
                        ("token_policy_versions", _INT32)):
        _column(name, getattr(c, name), dtype, at.token[-1])
    _column("student_topk_ids", c.student_topk_ids, _INT32, at.student[-1])

    faults.add([i for i, length in enumerate(c.prompt_lens) if length == 0], "prompt_ids is empty")
    faults.add([i for i, kind in enumerate(c.kind) if kind not in _KINDS],
               lambda i: f"kind {c.kind[i]!r} is not one of {sorted(_KINDS)}")
    nonempty = [i for i in range(m) if n[i]]
    if nonempty:
        oldest = np.minimum.reduceat(c.token_policy_versions, [at.token[i] for i in nonempty]).tolist()
        faults.add([i for i, low in zip(nonempty, oldest) if low != c.policy_versions[i]],
                   lambda i: (f"policy_version={c.policy_versions[i]} differs from min(token_policy_versions)="
                              f"{int(c.token_policy_versions[at.token[i]:at.token[i + 1]].min())}"))
    faults.add(_bad_rows(c.student_topk_ids, n, k, at.student, _negative_rows), "student_topk_ids holds negative ids")
    faults.add(_bad_rows(c.student_topk_ids, n, k, at.student, _repeating_rows),
               "student_topk_ids repeats an id within a row")
    return at


def _build_rollouts(c: RolloutColumns, at: _Layout, keep: list[int]) -> dict[int, Rollout]:
    built = {}
    for i in keep:
        a, b = at.token[i], at.token[i + 1]
        k = at.k[i]
        built[i] = build_checked(Rollout, {
            "rollout_id": c.rollout_id[i], "kind": c.kind[i], "batch_index": c.batch_index[i],
            "group_id": c.group_id[i], "actor_index": c.actor_index[i],
            "prompt_ids": c.prompt_ids[at.prompt[i]:at.prompt[i + 1]], "response_ids": c.response_ids[a:b],
            "behaviour_logprobs": c.behaviour_logprobs[a:b], "token_policy_versions": c.token_policy_versions[a:b],
            "policy_version": c.policy_versions[i], "reward": c.reward[i], "finish_reason": c.finish_reason[i],
            "student_topk_ids": None if k == 0 else c.student_topk_ids[at.student[i]:at.student[i + 1]].reshape(
                at.n[i], k),
            "slot_id": c.slot_id[i]})
    return built


def _kept(faults: _Faults, m: int, where: str, problems: list[str] | None) -> list[int]:
    """The elements without a fault; each faulty one reported in ``problems``."""
    if not faults.by_element:
        return list(range(m))
    if problems is not None:
        for i in sorted(faults.by_element):
            problems.append(f"{where}[{i}] dropped: {faults.by_element[i]}")
    return [i for i in range(m) if i not in faults.by_element]


def rollouts_of(c: RolloutColumns, problems: list[str] | None = None) -> RolloutBatch:
    """The batch in ``c`` without its malformed elements (each reported in ``problems``);
    raises ValueError when the columns themselves are inconsistent."""
    faults = _Faults()
    at = _check_rollouts(c, faults)
    keep = _kept(faults, at.m, "RolloutBatch.rollouts", problems)
    return RolloutBatch.of(list(_build_rollouts(c, at, keep).values()))


def scored_of(c: ScoredColumns, problems: list[str] | None = None) -> ScoredBatch:
    """The batch in ``c`` without its malformed elements (each reported in ``problems``);
    raises ValueError when the columns themselves are inconsistent."""
    faults = _Faults()
    at = _check_rollouts(c.rollouts, faults)
    _same_length(c, ("teacher_index", "score_s", "policy_versions", "topk_width"), at.m)
    n, k, width = at.n, at.k, c.topk_width
    union = _offsets("topk_width", [a * b for a, b in zip(n, width)])
    if min(width, default=0) < 0:
        raise ValueError("column topk_width holds a negative width")
    _column("teacher_logprobs", c.teacher_logprobs, _FLOAT32, at.token[-1])
    _column("topk_ids", c.topk_ids, _INT32, union[-1])
    _column("topk_logprobs", c.topk_logprobs, _FLOAT32, union[-1])

    faults.add([i for i, (a, b) in enumerate(zip(c.policy_versions, c.rollouts.policy_versions)) if a != b],
               "policy_version differs from the rollout's")
    faults.add([i for i, w in enumerate(width) if w % 2],
               lambda i: f"topk_ids has {width[i]} columns; the union of two top-k sets has 2k (k >= 1)")
    faults.add([i for i, (w, sk) in enumerate(zip(width, k)) if w and sk and w != 2 * sk],
               lambda i: (f"topk_ids has {width[i]} columns, the rollout's student_topk_ids has {k[i]} "
                          "(expected 2k)"))
    faults.add(_bad_rows(c.topk_ids, n, width, union, _misplaced_padding_rows),
               "topk_ids may hold -1 only as padding at the end of a row")

    keep = _kept(faults, at.m, "ScoredBatch.scored", problems)
    rollouts = _build_rollouts(c.rollouts, at, keep)
    token = at.token
    scored = []
    for i in keep:
        w = width[i]
        scored.append(build_checked(ScoredRollout, {
            "rollout": rollouts[i], "teacher_logprobs": c.teacher_logprobs[token[i]:token[i + 1]],
            "teacher_index": c.teacher_index[i], "score_s": c.score_s[i], "policy_version": c.policy_versions[i],
            "topk_ids": None if w == 0 else c.topk_ids[union[i]:union[i + 1]].reshape(n[i], w),
            "topk_logprobs": None if w == 0 else c.topk_logprobs[union[i]:union[i + 1]].reshape(n[i], w)}))
    return ScoredBatch.of(scored)
