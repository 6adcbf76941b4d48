"""Teacher scoring backends: per-token teacher log-probs of a response.

A scorer takes rollouts and returns, for each, a :class:`TeacherScore`:
``log p_teacher(y_t | prompt, y_<t)`` for every response token and, with top-k
distillation (``top_k = k > 0``), the support of the top-k reverse KL at every
response position: the teacher's k most likely ids (most likely first), then the
rollout's ``student_topk_ids`` the teacher's list lacks, padded with -1 to 2k, with
the teacher's log-prob of each id (0 at padding).

:class:`HFScorer` runs one transformers forward over each token-budgeted batch of
prompt+response sequences, and applies the output head and the log-softmax only at
response positions (never [batch, seq, vocab] logits of the whole batch: on a
large-vocabulary teacher those dominate memory).

This module does no networking; :mod:`asyncopd.teacher.worker` feeds it. The
backend that scores on a remote vLLM server is :mod:`asyncopd.teacher.http`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from asyncopd.types import Rollout

__all__ = ["Scorer", "TeacherScore", "HFScorer", "check_topk_width", "split_by_token_budget", "topk_union"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Log-probs held at once while scoring: response positions x vocabulary, float32 (64 MiB).
_CHUNK_LOGITS = 1 << 24


@dataclass(frozen=True, slots=True)
class TeacherScore:
    """The teacher's verdict on one rollout; arrays have one row per response token."""

    logprobs: np.ndarray
    """float32 [n]: log p_teacher of each sampled response token."""
    topk_ids: np.ndarray | None = None
    """int32 [n, 2k]: teacher top-k, then the student's top-k ids not among them, -1 padded.
    None when top-k distillation is off."""
    topk_logprobs: np.ndarray | None = None
    """float32 [n, 2k]: log p_teacher of each id in ``topk_ids``; 0 at padding."""


class Scorer(Protocol):
    def score(self, rollouts: Sequence[Rollout]) -> list[TeacherScore]:
        """One :class:`TeacherScore` per rollout, in order."""
        ...


def split_by_token_budget(rollouts: Sequence[Rollout], max_batch_tokens: int) -> list[list[Rollout]]:
    """Group rollouts (longest first) so each group's padded size rows * max_len
    stays within ``max_batch_tokens``; a single over-budget rollout forms its own group."""
    ordered = sorted(rollouts, key=lambda r: r.num_tokens, reverse=True)
    groups: list[list[Rollout]] = []
    for rollout in ordered:
        if groups:
            group = groups[-1]
            padded = (len(group) + 1) * max(group[0].num_tokens, rollout.num_tokens)
            if padded <= max_batch_tokens:
                group.append(rollout)
                continue
        groups.append([rollout])
    return groups


def topk_union(logprobs: Tensor, k: int, student_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """The top-k KL support of each row and the teacher's log-probs on it.

    logprobs: float [n, vocab], the teacher's log-softmax at n positions.
    student_ids: int64 [n, k] distinct ids per row, -1 for none (or None: teacher ids only).
    Returns (ids int64 [n, 2k], log-probs float [n, 2k]): the teacher's top-k in
    descending order, then the student ids not among them in their own order, then
    -1 (log-prob 0).
    """
    n = logprobs.shape[0]
    teacher_lp, teacher_ids = torch.topk(logprobs, k, dim=-1)  # [n, k] each, sorted
    if student_ids is None:
        student_ids = teacher_ids.new_full((n, k), -1)
        fresh = torch.zeros(n, k, dtype=torch.bool, device=logprobs.device)
    else:
        in_teacher = torch.zeros_like(logprobs, dtype=torch.bool).scatter_(1, teacher_ids, True)  # [n, vocab]
        fresh = ~in_teacher.gather(1, student_ids.clamp(min=0)) & (student_ids >= 0)  # [n, k]
    # Move the fresh student ids to the front of their half, keeping their order.
    order = torch.sort((~fresh).to(torch.int8), dim=1, stable=True).indices
    fresh = fresh.gather(1, order)
    student_ids = torch.where(fresh, student_ids.gather(1, order), -1)
    student_lp = torch.where(fresh, logprobs.gather(1, student_ids.clamp(min=0)), 0.0)
    return torch.cat([teacher_ids, student_ids], dim=1), torch.cat([teacher_lp, student_lp], dim=1)


class HFScorer:
    """Scores with a Hugging Face causal LM held in this process."""

    def __init__(self, model_path: str, *, dtype: str = "float32", device: str | None = None, top_k: int = 0) -> None:
        """``top_k``: teacher.top_k, the width k of the top-k support (0 = sampled tokens only);
        ``device``: the rank's device from the job's placement (:func:`asyncopd.placement.rank_device`),
        None for the CPU; the scorer never picks a device itself."""
        self.device = torch.device(device or "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype]).to(self.device)
        self.model.eval()
        text_config = self.model.config.get_text_config()
        # Soft-capped or scaled logits are computed by the model's own forward only.
        self._full_logits = bool(getattr(text_config, "final_logit_softcapping", None)
                                 or getattr(text_config, "logit_scale", None))
        self.vocab_size = self.model.config.vocab_size
        if not 0 <= top_k <= self.vocab_size:
            raise ValueError(f"teacher.top_k={top_k}: must be in [0, {self.vocab_size}] (the teacher's "
                             f"vocabulary size). Fix: set teacher.top_k to at most {self.vocab_size}.")
        self.top_k = top_k

    @torch.inference_mode()
    def score(self, rollouts: Sequence[Rollout]) -> list[TeacherScore]:
        if not rollouts:
            return []
        for r in rollouts:
            self._check(r)
        lengths = [r.num_tokens for r in rollouts]
        width = max(lengths)
        input_ids = torch.zeros(len(rollouts), width, dtype=torch.long)
        attention = torch.zeros(len(rollouts), width, dtype=torch.long)
        for row, r in enumerate(rollouts):
            ids = np.concatenate([r.prompt_ids, r.response_ids])
            input_ids[row, : ids.size] = torch.from_numpy(ids.astype(np.int64))
            attention[row, : ids.size] = 1
        hidden = self._hidden(input_ids.to(self.device), attention.to(self.device))  # [B, T, H] (or logits)
        # Every response position of the batch at once: response token j of row b is
        # predicted at position start_b - 1 + j. One head, softmax and top-k over all of
        # them (chunked to bound the [n, vocab] log-probs), not ~10 small ops per rollout.
        counts = np.array([r.response_ids.shape[0] for r in rollouts])
        rows = torch.from_numpy(np.repeat(np.arange(len(rollouts)), counts)).to(self.device)  # [N]
        cols = torch.from_numpy(np.concatenate([np.arange(r.prompt_ids.shape[0] - 1, r.num_tokens - 1)
                                                for r in rollouts])).to(self.device)  # [N]
        targets = self._tensor(np.concatenate([r.response_ids for r in rollouts]))  # [N]
        student = None
        if self.top_k:
            student = self._tensor(np.concatenate([
                np.full((r.response_ids.shape[0], self.top_k), -1) if r.student_topk_ids is None
                else r.student_topk_ids for r in rollouts]))  # [N, k], -1: no student ids (greedy samples)
        sampled, ids, lps = [], [], []
        chunk = max(1, _CHUNK_LOGITS // self.vocab_size)
        for start in range(0, int(counts.sum()), chunk):
            stop = start + chunk
            logprobs = torch.log_softmax(self._head(hidden[rows[start:stop], cols[start:stop]]).float(), dim=-1)
            sampled.append(logprobs.gather(1, targets[start:stop, None]).squeeze(1))  # [n]
            if self.top_k:
                chunk_ids, chunk_lps = topk_union(logprobs, self.top_k, student[start:stop])
                ids.append(chunk_ids)
                lps.append(chunk_lps)
        if not sampled:  # no response token in the whole batch
            return [TeacherScore(logprobs=np.zeros(0, np.float32),
                                 topk_ids=np.zeros((0, 2 * self.top_k), np.int32) if self.top_k else None,
                                 topk_logprobs=np.zeros((0, 2 * self.top_k), np.float32) if self.top_k else None)
                    for _ in rollouts]
        bounds = np.cumsum(counts)[:-1]
        sampled_rows = np.split(_numpy(torch.cat(sampled), np.float32), bounds)
        if not self.top_k:
            return [TeacherScore(logprobs=row) for row in sampled_rows]
        ids_rows = np.split(_numpy(torch.cat(ids), np.int32), bounds)
        lps_rows = np.split(_numpy(torch.cat(lps), np.float32), bounds)
        return [TeacherScore(logprobs=a, topk_ids=b, topk_logprobs=c) for a, b, c in zip(sampled_rows, ids_rows,
                                                                                          lps_rows)]

    def _hidden(self, input_ids: Tensor, attention: Tensor) -> Tensor:
        # use_cache=False: one forward per batch, nothing to continue; building the
        # DynamicCache cost ~3% of the teacher's CPU on the demo.
        if self._full_logits:
            return self.model(input_ids=input_ids, attention_mask=attention, use_cache=False).logits
        return self.model.base_model(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state

    def _head(self, hidden: Tensor) -> Tensor:
        return hidden if self._full_logits else self.model.get_output_embeddings()(hidden)

    def _tensor(self, array: np.ndarray) -> Tensor:
        return torch.from_numpy(array.astype(np.int64)).to(self.device)

    def _check(self, r: Rollout) -> None:
        """Refuse a rollout this teacher cannot score (the worker acks it as failed)."""
        ids = np.concatenate([r.prompt_ids, r.response_ids])
        if r.student_topk_ids is not None and r.student_topk_ids.size:
            ids = np.concatenate([ids, r.student_topk_ids.ravel()])
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ValueError(
                f"rollout {r.rollout_id} has token id {int(ids.max())} outside the teacher's vocabulary "
                f"({self.vocab_size}); teacher and student must share a tokenizer"
            )
        check_topk_width(r, self.top_k)


def check_topk_width(r: Rollout, top_k: int) -> None:
    """Refuse a rollout whose student top-k does not fit teacher.top_k (actors and
    teachers were started with different settings)."""
    if not top_k:
        return
    student = r.student_topk_ids
    if student is None and r.kind not in ("eval_greedy", "eval_reference"):  # neither is sampled with top-k
        raise ValueError(f"rollout {r.rollout_id} ({r.kind}) carries no student_topk_ids but teacher.top_k="
                         f"{top_k}; actors and teachers must run with the same teacher.top_k")
    if student is not None and student.shape[1] != top_k:
        raise ValueError(f"rollout {r.rollout_id} carries {student.shape[1]} student top-k ids per token, "
                         f"teacher.top_k={top_k}; actors and teachers must run with the same teacher.top_k")


def _numpy(tensor: Tensor, dtype: type) -> np.ndarray:
    return tensor.cpu().numpy().astype(dtype, copy=False)
