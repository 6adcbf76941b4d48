"""What the actor's engine returns for a request, unpacked from vLLM's record of it.

:class:`asyncopd.actor.engine.VllmEngine` asks vLLM for one output per request, when it
finishes (``RequestOutputKind.FINAL_ONLY``): every generated id, the ``FlatLogprobs`` of
every position (the sampled token first, then the top-k with ranks 1..k) and the
(weight version, first token) spans that vLLM labels tokens with. :class:`PendingRequest`
turns that record into a :class:`Completion` of numpy arrays, checking the layout for
all positions at once, so that a change of vLLM's layout fails loudly instead of
feeding wrong ids to the teacher. Pure: no vLLM import, no engine state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Completion", "PendingRequest"]


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
    if n == 0:
        return versions
    if not starts or starts[0][1] != 0:
        raise RuntimeError(f"vLLM reported no weight version for the first tokens of {request_id!r} "
                           f"(spans {list(starts)}); tokens cannot be tagged with their policy_version.")
    ends = [start for _, start in starts[1:]] + [n]
    for (label, start), end in zip(starts, ends):
        versions[start:end] = int(label)
    return versions
