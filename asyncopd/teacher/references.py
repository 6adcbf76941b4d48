"""The teacher's own samples of the held-out prompts: the evaluation's references.

Teacher rank 0 makes them once per job, at start-up and before the roles connect::

    held-out prompts ─tokenize (student tokenizer, as the actors do)─> teacher samples
        (T=1, top-k/top-p off, seed = actor.seed, up to actor.max_new_tokens)
        ─TeacherReferences─> rendezvous store "eval/teacher_references"
              ├─> actors: score them with the student at every eval (NLL of teacher samples)
              └─> learner rank 0: how many eval_reference results to expect

Sampling happens where the teacher is: ``generate`` of the HF teacher in this
process, or the server's ``/completions`` (``return_token_ids``) with
teacher.backend=vllm_http. If the server cannot sample them, the job goes on
without them: the message carries ``skipped_reason`` and every role logs it.

This module does not score anything; the scorers are in
:mod:`asyncopd.teacher.scorer` and :mod:`asyncopd.teacher.http`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from asyncopd.config import JobConfig
from asyncopd.transport import codec
from asyncopd.transport.discovery import TEACHER_REFERENCES_KEY, Rendezvous
from asyncopd.types import TeacherReference, TeacherReferences

__all__ = ["generate_with_hf", "generate_with_server", "publish_references", "cut_at_eos", "fit_for_scoring"]

logger = logging.getLogger(__name__)

PromptIds = tuple[int, list[int]]
"""(held-out prompt index, prompt token ids)."""


def cut_at_eos(tokens: Sequence[int], eos_ids: set[int], max_new_tokens: int) -> tuple[list[int], str]:
    """The response up to and including its first EOS ("stop"), else its first
    ``max_new_tokens`` tokens ("length")."""
    for i, token in enumerate(tokens[:max_new_tokens]):
        if token in eos_ids:
            return list(tokens[: i + 1]), "stop"
    return list(tokens[:max_new_tokens]), "length"


def fit_for_scoring(references: Sequence[TeacherReference], max_model_len: int) -> list[TeacherReference]:
    """The references as the actors can score them: prompt + response within
    ``max_model_len - 1`` tokens (scoring generates one throwaway token), the response
    cut if needed (only a full-length prompt with a full-length answer loses its last
    token); one that leaves no response token, or has none, is dropped."""
    fitted = []
    for r in references:
        room = max_model_len - 1 - r.prompt_ids.shape[0]
        if r.response_ids.shape[0] == 0:
            continue  # nothing to score (a server that answered no token)
        if room >= r.response_ids.shape[0]:
            fitted.append(r)
        elif room > 0:
            fitted.append(_reference(r.prompt_index, r.prompt_ids.tolist(), r.response_ids[:room].tolist(),
                                     r.finish_reason))
    return fitted


def _reference(index: int, prompt: list[int], response: list[int], finish_reason: str) -> TeacherReference:
    return TeacherReference(prompt_index=index, prompt_ids=np.asarray(prompt, dtype=np.int32),
                            response_ids=np.asarray(response, dtype=np.int32), finish_reason=finish_reason)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """What ends a response, as vLLM decides: the tokenizer's EOS plus generation_config's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([configured] if isinstance(configured, int) else configured or [])
    return ids


@torch.inference_mode()
def generate_with_hf(model: Any, tokenizer: Any, prompts: Sequence[PromptIds], *, max_new_tokens: int,
                     seed: int, max_batch_tokens: int) -> list[TeacherReference]:
    """One T=1 sample per prompt from an HF causal LM, in left-padded batches of at most
    ``max_batch_tokens`` (prompt + response) tokens; batch ``b`` is seeded ``seed + b``."""
    from transformers import GenerationConfig

    eos_ids = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              eos_token_id=sorted(eos_ids) or None, pad_token_id=pad)
    longest = max((len(ids) for _, ids in prompts), default=1)
    rows = max(1, max_batch_tokens // (longest + max_new_tokens))
    device = next(model.parameters()).device
    references = []
    for b, start in enumerate(range(0, len(prompts), rows)):
        batch = prompts[start : start + rows]
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (_, ids) in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        torch.manual_seed(seed + b)
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             generation_config=config)
        for row, (index, ids) in enumerate(batch):
            response, reason = cut_at_eos(out[row, width:].tolist(), eos_ids, max_new_tokens)
            references.append(_reference(index, ids, response, reason))
    return references


def generate_with_server(server: Any, model: str, prompts: Sequence[PromptIds], *, max_new_tokens: int,
                         seed: int, max_request_tokens: int) -> list[TeacherReference]:
    """One T=1 sample per prompt from the teacher server's ``/completions`` (token-id
    prompts, several per request, ``return_token_ids``); raises
    :class:`~asyncopd.teacher.http.TeacherServerError` if the server cannot."""
    from asyncopd.teacher.http import TeacherServerError

    longest = max((len(ids) for _, ids in prompts), default=1)
    rows = max(1, max_request_tokens // (longest + max_new_tokens))
    references = []
    for start in range(0, len(prompts), rows):
        batch = prompts[start : start + rows]
        # Explicit neutral sampling: the server would otherwise apply the model's
        # generation_config defaults (top-k, repetition penalty, ...).
        choices = server.complete({
            "model": model, "prompt": [ids for _, ids in batch], "max_tokens": max_new_tokens,
            "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
            "seed": seed + start, "return_token_ids": True})
        choices = sorted(choices, key=lambda c: c.index)
        if len(choices) != len(batch) or any(c.token_ids is None for c in choices):
            raise TeacherServerError(
                f"{server.url}/completions answered {len(choices)} choices for {len(batch)} prompts, or no "
                "token_ids; return_token_ids needs vLLM >= 0.10.2. Fix: upgrade the teacher server, or set "
                "eval.teacher_samples=false.")
        for (index, ids), choice in zip(batch, choices):
            reason = "stop" if choice.finish_reason == "stop" else "length"
            references.append(_reference(index, ids, list(choice.token_ids)[:max_new_tokens], reason))
    return references


def _held_out_prompts(cfg: JobConfig, tokenizer: Any) -> list[PromptIds]:
    from asyncopd.tasks import load_task

    task = load_task(cfg.task, tokenizer=tokenizer,
                     max_prompt_tokens=cfg.actor.max_model_len - cfg.actor.max_new_tokens)
    prompts = task.eval_prompts()
    if not prompts:
        return []
    encoded = tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]
    return [(p.index, list(ids)) for p, ids in zip(prompts, encoded)]


def publish_references(cfg: JobConfig, rendezvous: Rendezvous, scorer: Any, student_path: str) -> None:
    """Teacher rank 0: sample the references with ``scorer``'s teacher (an HFScorer's
    model, or an HttpScorer's server) and publish them, or why there are none."""
    from transformers import AutoTokenizer

    from asyncopd.teacher.http import HttpScorer, TeacherServerError

    references: list[TeacherReference] = []
    skipped = None
    if not cfg.eval.teacher_samples:
        skipped = "eval.teacher_samples=false"
    else:
        tokenizer = AutoTokenizer.from_pretrained(student_path)
        prompts = _held_out_prompts(cfg, tokenizer)
        settings = dict(max_new_tokens=cfg.actor.max_new_tokens, seed=cfg.actor.seed)
        if isinstance(scorer, HttpScorer):
            try:
                references = generate_with_server(scorer.server, scorer.model, prompts,
                                                  max_request_tokens=cfg.teacher.max_batch_tokens, **settings)
            except TeacherServerError as exc:
                skipped = f"the teacher server could not sample them ({exc})"
        else:
            references = generate_with_hf(scorer.model, tokenizer, prompts,
                                          max_batch_tokens=cfg.teacher.max_batch_tokens, **settings)
    references = fit_for_scoring(references, cfg.actor.max_model_len)
    message = TeacherReferences(policy_version=0, references=references, skipped_reason=skipped)
    rendezvous.publish_bytes(TEACHER_REFERENCES_KEY, codec.encode(message))
    if skipped:
        logger.warning("teacher 0: no teacher samples of the held-out prompts: %s; evaluations skip the NLL of "
                       "teacher samples and compare the student's diversity with its own start", skipped)
    else:
        lengths = [r.response_ids.shape[0] for r in references]
        logger.info("teacher 0: sampled %d held-out references (mean %.1f tokens) for the evaluation",
                    len(references), float(np.mean(lengths)) if lengths else 0.0)
