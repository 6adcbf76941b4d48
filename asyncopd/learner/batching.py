"""Training samples and their packing into padded micro-batches.

A :class:`TrainSample` is one scored rollout reduced to what the learner needs
(numpy arrays, as they arrive off the wire). :func:`pack_micro_batches` groups
samples into right-padded ``[batch, seq]`` tensors under a token budget.

Alignment (the one invariant every consumer relies on): a sequence is
``prompt + response``; the logits at position ``t`` predict token ``t + 1``, so
``response_mask[b, t]`` is True exactly when token ``t + 1`` is a response token,
and ``lp_behaviour[b, t]`` / ``lp_teacher[b, t]`` (and the top-k candidates
``topk_ids[b, t, :]``) describe that token.
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

__all__ = ["TrainSample", "MicroBatch", "pack_micro_batches", "count_response_tokens", "count_sequences",
           "topk_overlap"]


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
    adv_base: float = 0.0
    """The sequence's base advantage (GRPO / REINFORCE++), computed over the whole
    batch by :func:`asyncopd.learner.loss.sequence_advantages`; 0 for pure OPD."""
    topk_ids: np.ndarray | None = None
    """int32 [response_len, K]: candidate ids of the top-k reverse KL (teacher top-k
    then student top-k), -1 padded; None without top-k distillation."""
    topk_logprobs: np.ndarray | None = None
    """float32 [response_len, K]: the teacher's log-prob of each candidate id."""

    def __post_init__(self) -> None:
        _check_array("prompt_ids", self.prompt_ids, np.int32, None)
        _check_array("response_ids", self.response_ids, np.int32, None)
        n = self.response_ids.shape[0]
        _check_array("behaviour_logprobs", self.behaviour_logprobs, np.float32, n)
        _check_array("teacher_logprobs", self.teacher_logprobs, np.float32, n)
        if self.prompt_ids.shape[0] == 0:
            raise ValueError("TrainSample.prompt_ids is empty; the first response token needs at least "
                             "one prompt token (e.g. BOS) to be predicted from")
        if (self.topk_ids is None) != (self.topk_logprobs is None):
            raise ValueError("TrainSample.topk_ids and topk_logprobs come together (both or neither)")
        if self.topk_ids is not None:
            for name, dtype in (("topk_ids", np.int32), ("topk_logprobs", np.float32)):
                array = getattr(self, name)
                if array.dtype != np.dtype(dtype) or array.ndim != 2 or array.shape[0] != n:
                    raise ValueError(f"TrainSample.{name} must be {np.dtype(dtype)} [response_len={n}, k], "
                                     f"got {array.dtype} {array.shape}")
            if self.topk_ids.shape != self.topk_logprobs.shape:
                raise ValueError(f"TrainSample.topk_ids {self.topk_ids.shape} and topk_logprobs "
                                 f"{self.topk_logprobs.shape} differ in shape")

    @classmethod
    def from_scored(cls, scored: ScoredRollout, adv_base: float = 0.0) -> TrainSample:
        rollout = scored.rollout
        return cls(prompt_ids=rollout.prompt_ids, response_ids=rollout.response_ids,
                   behaviour_logprobs=rollout.behaviour_logprobs,
                   teacher_logprobs=scored.teacher_logprobs, adv_base=adv_base,
                   topk_ids=scored.topk_ids, topk_logprobs=scored.topk_logprobs)

    @property
    def top_k(self) -> int:
        """Candidate ids per token (0 without top-k distillation)."""
        return 0 if self.topk_ids is None else int(self.topk_ids.shape[1])

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
    adv_base: Tensor
    """float32 [B, T]: the row's sequence base advantage on its response positions, else 0."""
    num_sequences: int
    """Rows with at least one response token (the seq-mean normaliser's share)."""
    topk_ids: Tensor | None = None
    """int64 [B, T, K]: candidate ids for token t + 1 (-1 = none); None without top-k."""
    topk_lp_teacher: Tensor | None = None
    """float32 [B, T, K]: the teacher's log-prob of each candidate (0 where none)."""

    def to(self, device: torch.device | str) -> MicroBatch:
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device)

        return MicroBatch(input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                          response_mask=self.response_mask.to(device),
                          lp_behaviour=self.lp_behaviour.to(device), lp_teacher=self.lp_teacher.to(device),
                          num_response_tokens=self.num_response_tokens, adv_base=self.adv_base.to(device),
                          num_sequences=self.num_sequences, topk_ids=move(self.topk_ids),
                          topk_lp_teacher=move(self.topk_lp_teacher))

    @classmethod
    def empty(cls, seq_len: int = 2, top_k: int = 0) -> MicroBatch:
        """A one-row batch with no response token: runs forward/backward (so every
        data-parallel rank joins the same FSDP collectives) but adds nothing."""
        return cls(input_ids=torch.zeros(1, seq_len, dtype=torch.long),
                   attention_mask=torch.ones(1, seq_len, dtype=torch.long),
                   response_mask=torch.zeros(1, seq_len, dtype=torch.bool),
                   lp_behaviour=torch.zeros(1, seq_len), lp_teacher=torch.zeros(1, seq_len),
                   num_response_tokens=0, adv_base=torch.zeros(1, seq_len), num_sequences=0,
                   topk_ids=torch.full((1, seq_len, top_k), -1, dtype=torch.long) if top_k else None,
                   topk_lp_teacher=torch.zeros(1, seq_len, top_k) if top_k else None)


def count_response_tokens(samples: Sequence[TrainSample]) -> int:
    """Response tokens in ``samples``: the token-mean normaliser of a batch."""
    return sum(sample.num_response_tokens for sample in samples)


def topk_overlap(student_topk_ids: np.ndarray, topk_ids: np.ndarray) -> np.ndarray:
    """Per response token, the share of the student's top-k ids that are among the
    teacher's top-k: student_topk_ids int [n, k] (the actor's behaviour top-k),
    topk_ids int [n, 2k] (the teacher's top-k first, as the teacher pool sends it)
    -> float [n] in [0, 1]."""
    k = student_topk_ids.shape[1]
    teacher = topk_ids[:, :k]  # [n, k]
    shared = (student_topk_ids[:, :, None] == teacher[:, None, :]).any(-1)  # [n, k]
    return shared.sum(-1) / max(k, 1)


def count_sequences(samples: Sequence[TrainSample]) -> int:
    """Samples with at least one response token: the seq-mean normaliser of a batch."""
    return sum(1 for sample in samples if sample.num_response_tokens)


def _collate(samples: Sequence[TrainSample]) -> MicroBatch:
    seq_len = max(sample.num_tokens for sample in samples)
    shape = (len(samples), seq_len)
    input_ids = np.zeros(shape, dtype=np.int64)
    attention_mask = np.zeros(shape, dtype=np.int64)
    response_mask = np.zeros(shape, dtype=bool)
    lp_behaviour = np.zeros(shape, dtype=np.float32)
    lp_teacher = np.zeros(shape, dtype=np.float32)
    adv_base = np.zeros(shape, dtype=np.float32)
    top_ks = {sample.top_k for sample in samples}
    if len(top_ks) != 1:
        raise ValueError(f"samples of one batch carry top-k candidates of different widths {sorted(top_ks)}; "
                         "every sample of a run must be scored with the same teacher.top_k")
    top_k = top_ks.pop()
    topk_ids = np.full((*shape, top_k), -1, dtype=np.int64) if top_k else None
    topk_lp = np.zeros((*shape, top_k), dtype=np.float32) if top_k else None
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
        adv_base[row, first:last] = sample.adv_base
        if top_k:
            topk_ids[row, first:last] = sample.topk_ids
            topk_lp[row, first:last] = sample.topk_logprobs
    return MicroBatch(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                      response_mask=torch.from_numpy(response_mask),
                      lp_behaviour=torch.from_numpy(lp_behaviour), lp_teacher=torch.from_numpy(lp_teacher),
                      num_response_tokens=count_response_tokens(samples), adv_base=torch.from_numpy(adv_base),
                      num_sequences=count_sequences(samples),
                      topk_ids=None if topk_ids is None else torch.from_numpy(topk_ids),
                      topk_lp_teacher=None if topk_lp is None else torch.from_numpy(topk_lp))


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
