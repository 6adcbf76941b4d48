"""What the actor's engine returns for a request, unpacked from vLLM's record of it.

:class:`asyncopd.actor.engine.VllmEngine` asks vLLM for one output per request, when it
finishes (``RequestOutputKind.FINAL_ONLY``): every generated id, the ``FlatLogprobs`` of
every position (the sampled token first, then the top-k with ranks 1..k) and the
(weight version, first token) spans that vLLM labels tokens with. :class:`PendingRequest`
turns that record into a :class:`Completion` of numpy arrays, checking the layout for
all positions at once, so that a change of vLLM's layout fails loudly instead of
feeding wrong ids to the teacher. :func:`complete_all` does the same for every request
that finished in one engine step with one conversion per array for all of them (a
128-sample step's requests mostly finish together; converting them one by one was ~4%
of the actor's CPU). Pure: no vLLM import, no engine state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Completion", "Finished", "PendingRequest", "complete_all"]


@dataclass(slots=True)
class Completion:
    """One finished request. All arrays share the length of ``token_ids``."""

    request_id: str
    token_ids: np.ndarray
    """int32 [n]: the generated tokens, the final EOS included when finish_reason is "stop"."""
    logprobs: np.ndarray
    """float32 [n]: behaviour log-prob of each token under the distribution it was sampled from."""
    token_policy_versions: np.ndarray
    """int32 [n]: the policy_version of the weights that produced each token."""
    finish_reason: str
    """"stop" (EOS sampled), "length" (max_new_tokens reached), "abort", or "scored"
    (a scoring request: ``token_ids`` is the given response, ``logprobs`` its log-probs)."""
    topk_ids: np.ndarray | None = None
    """int32 [n, k]: the k most likely ids of the sampling distribution at each position,
    most likely first; None when the engine's top_k is 0 and for greedy requests."""


@dataclass(slots=True)
class PendingRequest:
    """What the engine remembers of a request in flight (vLLM holds its tokens)."""

    top_k: int
    """Top-k ids recorded per token (0: none)."""
    scored: tuple[int, list[int]] | None = None
    """Scoring requests: (prompt length, prompt + response ids)."""

    def complete(self, request_id: str, finish_reason: str, token_ids: Sequence[int], flat: Any,
                 version_starts: Sequence[tuple[str, int]], prompt_flat: Any = None) -> Completion:
        """The request's :class:`Completion` from vLLM's accumulated record of it: every
        generated id, their ``FlatLogprobs``, the (weight version, first token) spans and,
        for scoring requests, the ``FlatLogprobs`` of the prompt positions."""
        n = len(token_ids)
        versions = _policy_versions(version_starts, n, request_id)
        if self.scored is not None:
            prompt_len, all_ids = self.scored
            logprobs = _prompt_logprobs(prompt_flat, all_ids, request_id)
            response = all_ids[prompt_len:]
            if len(logprobs) != len(all_ids) - 1:
                if finish_reason == "abort":  # aborted before its one step: nothing was scored
                    response, logprobs = [], [0.0] * (prompt_len - 1)
                else:
                    raise RuntimeError(f"scoring request {request_id!r} finished with {len(logprobs)} "
                                       f"prompt log-probs, expected {len(all_ids) - 1}.")
            version = int(versions[0]) if n else 0
            return Completion(
                request_id=request_id, token_ids=np.asarray(response, dtype=np.int32),
                logprobs=np.asarray(logprobs[prompt_len - 1:], dtype=np.float32),
                token_policy_versions=np.full(len(response), version, dtype=np.int32),
                finish_reason="scored" if response else "abort")
        ids, logprobs, topk_ids = _sampled_logprobs(token_ids, flat, self.top_k, request_id)
        return Completion(request_id=request_id, token_ids=ids, logprobs=logprobs, token_policy_versions=versions,
                          finish_reason=finish_reason, topk_ids=topk_ids)


class Finished(NamedTuple):
    """vLLM's record of one finished request, as :meth:`PendingRequest.complete` takes it."""

    request_id: str
    pending: PendingRequest
    finish_reason: str
    token_ids: Sequence[int]
    flat: Any
    """The FlatLogprobs of the generated positions."""
    version_starts: Sequence[tuple[str, int]]
    prompt_flat: Any = None


def complete_all(finished: Sequence[Finished]) -> list[Completion]:
    """:meth:`PendingRequest.complete` of every record, in order, the same arrays (the
    per-request ones are views into one array per top-k width); sampled requests of one
    top-k width are converted and checked together."""
    done: list[Completion | None] = [None] * len(finished)
    by_width: dict[int, list[int]] = {}
    for i, record in enumerate(finished):
        if record.pending.scored is not None or len(record.token_ids) == 0:
            done[i] = record.pending.complete(record.request_id, record.finish_reason, record.token_ids, record.flat,
                                              record.version_starts, record.prompt_flat)
        else:
            by_width.setdefault(record.pending.top_k, []).append(i)
    for top_k, indices in by_width.items():
        for i, completion in zip(indices, _complete_sampled([finished[i] for i in indices], top_k)):
            done[i] = completion
    return done  # type: ignore[return-value]


def _complete_sampled(records: list[Finished], top_k: int) -> list[Completion]:
    """Completions of sampled requests with ``top_k`` ids per position and at least one
    token each, converted as one array per field; a record of another layout is
    handed to the per-request path, whose error names it."""
    width = top_k + 1
    lengths, ids, table, logprobs, ranks, starts, labels, counts = [], [], [], [], [], [], [], []
    for record in records:
        n, flat = len(record.token_ids), record.flat
        if flat is None or len(flat.token_ids) != n * width or len(flat) != n:
            _sampled_logprobs(record.token_ids, flat, top_k, record.request_id)  # raises, naming it
        lengths.append(n)
        ids += record.token_ids
        table += flat.token_ids
        logprobs += flat.logprobs
        ranks += flat.ranks
        starts += flat.start_indices
        for (label, start), end in _spans(record.version_starts, n, record.request_id):
            labels.append(int(label))
            counts.append(end - start)
    total = len(ids)
    ids_array = np.asarray(ids, dtype=np.int32)
    table_array = np.asarray(table, dtype=np.int32).reshape(total, width)
    ranks_array = np.asarray(ranks, dtype=np.int64).reshape(total, width)[:, 1:]
    offsets = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
    if (not np.array_equal(np.asarray(starts, dtype=np.int64), (np.arange(total) - offsets) * width)
            or not np.array_equal(table_array[:, 0], ids_array)
            or not (ranks_array == np.arange(1, width, dtype=np.int64)).all()):
        for record in records:  # find the record and name it
            _sampled_logprobs(record.token_ids, record.flat, top_k, record.request_id)
        raise AssertionError("a layout error was found in the batch but in none of its records")
    logprobs_array = np.ascontiguousarray(np.asarray(logprobs, dtype=np.float32).reshape(total, width)[:, 0])
    topk_array = np.ascontiguousarray(table_array[:, 1:]) if top_k else None
    versions = np.repeat(np.asarray(labels, dtype=np.int32), counts)
    completions, start = [], 0
    for record, n in zip(records, lengths):
        end = start + n
        completions.append(Completion(
            request_id=record.request_id, token_ids=ids_array[start:end], logprobs=logprobs_array[start:end],
            token_policy_versions=versions[start:end], finish_reason=record.finish_reason,
            topk_ids=None if topk_array is None else topk_array[start:end]))
        start = end
    return completions


def _sampled_logprobs(token_ids: Sequence[int], flat: Any, top_k: int,
                      request_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(ids int32 [n], behaviour log-probs float32 [n], top-k ids int32 [n, k] or None)
    from vLLM's ``FlatLogprobs`` of the n generated positions.

    Each position holds the sampled token first (its rank may be anything), then the
    top-k ids with ranks 1..k, most likely first; checked for all positions at once, so
    that a change of that layout fails here instead of feeding wrong ids to the teacher.
    """
    n, width = len(token_ids), top_k + 1
    ids = np.asarray(token_ids, dtype=np.int32)
    if n == 0:  # an abort before the first token
        return ids, np.zeros(0, dtype=np.float32), np.zeros((0, top_k), dtype=np.int32) if top_k else None
    got = (0, 0) if flat is None else (len(flat.token_ids), len(flat))
    if got != (n * width, n):
        raise RuntimeError(f"vLLM returned {n} tokens for {request_id!r} without {width} log-probs each "
                           f"(got {got[0]} for {got[1]} positions); SamplingParams(logprobs={top_k}, "
                           "flat_logprobs=True) was not honoured.")
    table_ids = np.asarray(flat.token_ids, dtype=np.int32).reshape(n, width)
    ranks = np.asarray(flat.ranks, dtype=np.int64).reshape(n, width)[:, 1:]
    starts = np.asarray(flat.start_indices, dtype=np.int64)
    if (not np.array_equal(starts, np.arange(0, n * width, width)) or not np.array_equal(table_ids[:, 0], ids)
            or not (ranks == np.arange(1, width, dtype=np.int64)).all()):
        raise RuntimeError(
            f"vLLM's log-probs for {request_id!r} do not hold each sampled token followed by ranks 1..{top_k} "
            f"(ids {flat.token_ids[:2 * width]}, ranks {flat.ranks[:2 * width]}, sampled {list(token_ids[:2])}); "
            f"SamplingParams(logprobs={top_k}, flat_logprobs=True) was not honoured.")
    logprobs = np.asarray(flat.logprobs, dtype=np.float32).reshape(n, width)[:, 0].copy()
    return ids, logprobs, (np.ascontiguousarray(table_ids[:, 1:]) if top_k else None)


def _prompt_logprobs(flat: Any, all_ids: Sequence[int], request_id: str) -> list[float]:
    """log p(all_ids[p] | all_ids[:p]) for p >= 1 (at index p - 1) from vLLM's
    ``FlatLogprobs`` of the prompt positions (the first one is empty)."""
    logprobs: list[float] = []
    for position in range(len(flat) if flat is not None else 0):
        start, end = flat.start_indices[position], flat.end_indices[position]
        if start == end:
            continue
        index = len(logprobs) + 1
        if flat.token_ids[start] != all_ids[index]:
            raise RuntimeError(f"vLLM's prompt log-probs for {request_id!r} name token {flat.token_ids[start]} "
                               f"at position {index}, where the scored sequence holds {all_ids[index]}.")
        logprobs.append(flat.logprobs[start])
    return logprobs


def _policy_versions(starts: Sequence[tuple[str, int]], n: int, request_id: str) -> np.ndarray:
    """int32 [n]: each token's policy_version, from vLLM's (weight version label, first
    token) spans (labels are the policy versions :meth:`VllmEngine.step` set)."""
    versions = np.empty(n, dtype=np.int32)
    for (label, start), end in _spans(starts, n, request_id):
        versions[start:end] = int(label)
    return versions


def _spans(starts: Sequence[tuple[str, int]], n: int, request_id: str) -> list[tuple[tuple[str, int], int]]:
    """((label, first token), end) of every span of n tokens; none for n = 0."""
    if n == 0:
        return []
    if not starts or starts[0][1] != 0:
        raise RuntimeError(f"vLLM reported no weight version for the first tokens of {request_id!r} "
                           f"(spans {list(starts)}); tokens cannot be tagged with their policy_version.")
    return list(zip(starts, [start for _, start in starts[1:]] + [n]))
