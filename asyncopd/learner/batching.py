"""Training samples and their packing into padded micro-batches.

A :class:`TrainSample` is one scored rollout reduced to what the learner needs
(numpy arrays, as they arrive off the wire). :func:`pack_micro_batches` groups
samples into right-padded ``[batch, seq]`` tensors under a token budget.

Alignment (the one invariant every consumer relies on): a sequence is
``prompt + response``; the logits at position ``t`` predict token ``t + 1``, so
``response_mask[b, t]`` is True exactly when token ``t + 1`` is a response token,
and ``lp_behaviour[b, t]`` / ``lp_teacher[b, t]`` hold that token's log-probs.
:func:`asyncopd.learner.model.token_logprobs` returns log-probs in the same layout.

This module does not run models, move tensors between ranks or decide which
samples a rank trains on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from asyncopd.types import ScoredRollout

__all__ = ["TrainSample", "MicroBatch", "pack_micro_batches", "count_response_tokens"]


def _check_array(name: str, array: np.ndarray, dtype: type, length: int | None) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype != np.dtype(dtype):
        got = f"{type(array).__name__} {getattr(array, 'dtype', '')} {getattr(array, 'shape', '')}"
        raise ValueError(f"TrainSample.{name} must be a 1-d {np.dtype(dtype)} numpy array, got {got}; "
                         f"convert with np.asarray(x, dtype=np.{np.dtype(dtype)})")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"TrainSample.{name} has {array.shape[0]} entries but response_ids has {length}; "
                         "every per-token array must cover exactly the response tokens")


@dataclass(frozen=True, slots=True)
class TrainSample:
    """One response to train on: token ids and per-response-token log-probs."""

    prompt_ids: np.ndarray
    """int32 [prompt_len], at least one token (it predicts the first response token)."""
    response_ids: np.ndarray
    """int32 [response_len]."""
    behaviour_logprobs: np.ndarray
    """float32 [response_len]: the actor's sampling log-prob of each response token."""
    teacher_logprobs: np.ndarray
    """float32 [response_len]: the teacher's log-prob of each response token."""

    def __post_init__(self) -> None:
        _check_array("prompt_ids", self.prompt_ids, np.int32, None)
        _check_array("response_ids", self.response_ids, np.int32, None)
        n = self.response_ids.shape[0]
        _check_array("behaviour_logprobs", self.behaviour_logprobs, np.float32, n)
        _check_array("teacher_logprobs", self.teacher_logprobs, np.float32, n)
        if self.prompt_ids.shape[0] == 0:
            raise ValueError("TrainSample.prompt_ids is empty; the first response token needs at least "
                             "one prompt token (e.g. BOS) to be predicted from")

    @classmethod
    def from_scored(cls, scored: ScoredRollout) -> TrainSample:
        rollout = scored.rollout
        return cls(prompt_ids=rollout.prompt_ids, response_ids=rollout.response_ids,
                   behaviour_logprobs=rollout.behaviour_logprobs,
                   teacher_logprobs=scored.teacher_logprobs)

    @property
    def num_tokens(self) -> int:
        """Prompt plus response tokens: the sample's padded-row cost."""
        return int(self.prompt_ids.shape[0] + self.response_ids.shape[0])

    @property
    def num_response_tokens(self) -> int:
        return int(self.response_ids.shape[0])


@dataclass(frozen=True, slots=True)
class MicroBatch:
    """Right-padded tensors of one forward/backward pass, all ``[B, T]``."""

    input_ids: Tensor
    """int64 [B, T]: prompt + response, padded with 0."""
    attention_mask: Tensor
    """int64 [B, T]: 1 on real tokens."""
    response_mask: Tensor
    """bool [B, T]: True where the NEXT token (t + 1) is a response token."""
    lp_behaviour: Tensor
    """float32 [B, T]: behaviour log-prob of token t + 1 (0 where not a response token)."""
    lp_teacher: Tensor
    """float32 [B, T]: teacher log-prob of token t + 1 (0 where not a response token)."""
    num_response_tokens: int
    """response_mask.sum(): the tokens this micro-batch contributes to the loss."""

    def to(self, device: torch.device | str) -> MicroBatch:
        return MicroBatch(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                          response_mask=self.response_mask.to(device),
                          lp_behaviour=self.lp_behaviour.to(device), lp_teacher=self.lp_teacher.to(device),
                          num_response_tokens=self.num_response_tokens)

    @classmethod
    def empty(cls, seq_len: int = 2) -> MicroBatch:
        """A one-row batch with no response token: runs forward/backward (so every
        data-parallel rank joins the same FSDP collectives) but adds nothing."""
        return cls(input_ids=torch.zeros(1, seq_len, dtype=torch.long),
                   attention_mask=torch.ones(1, seq_len, dtype=torch.long),
                   response_mask=torch.zeros(1, seq_len, dtype=torch.bool),
                   lp_behaviour=torch.zeros(1, seq_len), lp_teacher=torch.zeros(1, seq_len),
                   num_response_tokens=0)


def count_response_tokens(samples: Sequence[TrainSample]) -> int:
    """Response tokens in ``samples``: the token-mean normaliser of a batch."""
    return sum(sample.num_response_tokens for sample in samples)


def _collate(samples: Sequence[TrainSample]) -> MicroBatch:
    seq_len = max(sample.num_tokens for sample in samples)
    shape = (len(samples), seq_len)
    input_ids = np.zeros(shape, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    response_mask = np.zeros(shape, dtype=bool)
    lp_behaviour = np.zeros(shape, dtype=np.float32)
    lp_teacher = np.zeros(shape, dtype=np.float32)
    for row, sample in enumerate(samples):
        prompt_len, length = sample.prompt_ids.shape[0], sample.num_tokens
        input_ids[row, :prompt_len] = sample.prompt_ids
        input_ids[row, prompt_len:length] = sample.response_ids
        attention_mask[row, :length] = 1
        # Response token i sits at position prompt_len + i; it is predicted at prompt_len + i - 1.
        first, last = prompt_len - 1, length - 1
        response_mask[row, first:last] = True
        lp_behaviour[row, first:last] = sample.behaviour_logprobs
        lp_teacher[row, first:last] = sample.teacher_logprobs
    return MicroBatch(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                      response_mask=torch.from_numpy(response_mask),
                      lp_behaviour=torch.from_numpy(lp_behaviour), lp_teacher=torch.from_numpy(lp_teacher),
                      num_response_tokens=count_response_tokens(samples))


def pack_micro_batches(samples: Sequence[TrainSample], token_budget: int) -> list[MicroBatch]:
    """Pack ``samples`` into micro-batches of at most ``token_budget`` padded tokens.

    Samples are sorted by length (longest first, stable) and filled greedily into
    rectangles ``rows * longest_row <= token_budget``, so rows of one micro-batch
    have similar lengths and padding stays small. A sample longer than the budget
    forms a micro-batch of its own. Sample order inside the result is not the
    input order (the token-mean loss does not depend on it). No samples: ``[]``.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget={token_budget}: must be positive (learner.micro_batch_tokens)")
    order = sorted(range(len(samples)), key=lambda i: -samples[i].num_tokens)
    groups: list[list[TrainSample]] = []
    row_len = 0
    for index in order:
        sample = samples[index]
        if groups and (len(groups[-1]) + 1) * row_len <= token_budget:
            groups[-1].append(sample)
        else:
            groups.append([sample])
            row_len = sample.num_tokens  # the longest row of the new group (sorted)
    return [_collate(group) for group in groups]
