"""Teacher scoring backends: per-token teacher log-probs of a response.

A scorer takes rollouts and returns, for each, ``log p_teacher(y_t | prompt, y_<t)``
for every response token. :class:`HFScorer` runs one transformers forward over
each token-budgeted batch of prompt+response sequences and takes the log-softmax
only at response positions (never a dense [tokens, vocab] log-softmax of the
whole batch).

This module does no networking; :mod:`asyncopd.teacher.worker` feeds it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from asyncopd.types import Rollout

__all__ = ["Scorer", "HFScorer", "split_by_token_budget"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Scorer(Protocol):
    def score(self, rollouts: Sequence[Rollout]) -> list[np.ndarray]: ...


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


class HFScorer:
    """Scores with a Hugging Face causal LM held in this process."""

    def __init__(self, model_path: str, *, dtype: str = "float32", device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_DTYPES[dtype]).to(self.device)
        self.model.eval()
        self.vocab_size = self.model.config.vocab_size

    @torch.inference_mode()
    def score(self, rollouts: Sequence[Rollout]) -> list[np.ndarray]:
        if not rollouts:
            return []
        lengths = [r.num_tokens for r in rollouts]
        width = max(lengths)
        input_ids = torch.zeros(len(rollouts), width, dtype=torch.long)
        attention = torch.zeros(len(rollouts), width, dtype=torch.long)
        for row, r in enumerate(rollouts):
            ids = np.concatenate([r.prompt_ids, r.response_ids])
            if ids.size and int(ids.max()) >= self.vocab_size:
                raise ValueError(
                    f"rollout {r.rollout_id} has token id {int(ids.max())} outside the teacher's vocabulary "
                    f"({self.vocab_size}); teacher and student must share a tokenizer"
                )
            input_ids[row, : ids.size] = torch.from_numpy(ids.astype(np.int64))
            attention[row, : ids.size] = 1
        logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device)).logits
        results = []
        for row, r in enumerate(rollouts):
            start, n = r.prompt_ids.shape[0], r.response_ids.shape[0]
            # logits at position t predict token t+1: response token j sits at start+j.
            rows = logits[row, start - 1 : start - 1 + n].float()  # [n, vocab]
            targets = torch.from_numpy(r.response_ids.astype(np.int64)).to(self.device)
            lp = torch.log_softmax(rows, dim=-1).gather(1, targets[:, None]).squeeze(1)
            results.append(lp.cpu().numpy().astype(np.float32))
        return results
