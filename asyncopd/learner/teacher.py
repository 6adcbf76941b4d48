"""The teacher inside the learner process (``teacher.backend=colocated``).

With a colocated teacher there are no teacher ranks (``cluster.teachers=0``):
actors send their rollouts to learner rank 0, which acknowledges training
rollouts at once (unscored) and scores held-out evaluation rollouts on arrival
(:meth:`ColocatedTeacher.score`). Training rollouts are scored inside the train
step, per micro-batch, from the same teacher forward that gives the whole
next-token distribution: the teacher's log-prob of every sampled token
(``lp_teacher``, for the OPD signal and metrics) and, with ``loss.kl_loss=full``,
the exact reverse KL over the vocabulary (:mod:`asyncopd.learner.full_kl`).

Every learner rank holds a full replica of the teacher (frozen, eval mode, on
the student's device, ``model.teacher.dtype``): it must fit beside the student's
shard on each learner device. It is not FSDP-sharded, so rank 0 can score
evaluation rollouts alone, without collectives.

This module does not compute losses or talk to sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import AutoModelForCausalLM

from asyncopd.learner.full_kl import teacher_chunk_fn
from asyncopd.learner.model import ChunkFn, token_logprobs
from asyncopd.types import Rollout

__all__ = ["ColocatedTeacher", "placeholder_teacher_logprobs"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def placeholder_teacher_logprobs(rollout: Rollout) -> np.ndarray:
    """float32 [response_len] of NaN: a training rollout's teacher log-probs before the
    train step computes them (a NaN that reached a loss would show, never a fake 0)."""
    return np.full(rollout.response_ids.shape[0], np.nan, dtype=np.float32)


class ColocatedTeacher:
    """A frozen Hugging Face causal LM beside the student, in the learner process."""

    def __init__(self, path: str | Path, *, dtype: str = "float32", device: torch.device | str = "cpu",
                 student_vocab_size: int | None = None) -> None:
        """``student_vocab_size``: the student head's width. When the teacher's differs
        (an embedding matrix padded to another multiple, same tokenizer), the full KL
        compares the first ``min`` ids of both."""
        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_DTYPES[dtype]).to(device)
        self.model.config.use_cache = False
        self.model.eval()
        self.model.requires_grad_(False)
        self.head = self.model.get_output_embeddings()
        width = self.head.weight.shape[0]
        self.vocab_size: int | None = None
        if student_vocab_size is not None and student_vocab_size != width:
            self.vocab_size = min(student_vocab_size, width)
            logger.warning("teacher head has %d ids, student %d: the full reverse KL compares the first %d",
                           width, student_vocab_size, self.vocab_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def hidden(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The teacher's last hidden states [B, T, H] (no grad)."""
        return self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                     use_cache=False).last_hidden_state

    def full_kl_fn(self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor) -> ChunkFn:
        """One teacher forward over a micro-batch [B, T]; the chunk function that gives the
        full reverse KL and the teacher's sampled-token log-prob at every response
        position (see :func:`~asyncopd.learner.full_kl.teacher_chunk_fn`)."""
        return teacher_chunk_fn(self.hidden(input_ids, attention_mask), self.head, input_ids, response_mask,
                                vocab_size=self.vocab_size)

    @torch.no_grad()
    def logprobs(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The teacher's log-prob of each next token, float32 [B, T] aligned like the
        student's (:func:`~asyncopd.learner.model.token_logprobs`)."""
        return token_logprobs(self.model, input_ids, attention_mask)

    def score(self, rollouts: Sequence[Rollout], max_batch_tokens: int) -> list[np.ndarray]:
        """float32 [response_len] teacher log-probs of each rollout's response tokens,
        in order; forwards of at most ``max_batch_tokens`` padded tokens."""
        order = sorted(range(len(rollouts)), key=lambda i: -rollouts[i].num_tokens)
        results: list[np.ndarray | None] = [None] * len(rollouts)
        start = 0
        while start < len(order):
            width = max(rollouts[order[start]].num_tokens, 2)  # token_logprobs needs two positions
            rows = max(1, max_batch_tokens // width)
            group = order[start:start + rows]
            start += len(group)
            input_ids = torch.zeros(len(group), width, dtype=torch.long)
            attention = torch.zeros(len(group), width, dtype=torch.long)
            for row, i in enumerate(group):
                ids = np.concatenate([rollouts[i].prompt_ids, rollouts[i].response_ids]).astype(np.int64)
                input_ids[row, :ids.size] = torch.from_numpy(ids)
                attention[row, :ids.size] = 1
            lp = self.logprobs(input_ids.to(self.device), attention.to(self.device)).cpu()  # [rows, width]
            for row, i in enumerate(group):
                first, n = rollouts[i].prompt_ids.shape[0] - 1, rollouts[i].response_ids.shape[0]
                results[i] = lp[row, first:first + n].numpy().astype(np.float32)
        return results  # type: ignore[return-value]
