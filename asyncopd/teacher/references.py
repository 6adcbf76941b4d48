"""The evaluation's references sampled from a teacher rank's scorer.

Teacher rank 0 samples one answer per held-out prompt at start-up, before the roles
connect, with its teacher: ``generate`` of the HF teacher in this process
(:func:`asyncopd.references.generate_with_hf`), or the server's ``/completions``
(``return_token_ids``) with teacher.backend=vllm_http. If the server cannot sample
them, the job goes on without them: the message carries ``skipped_reason`` and every
role logs it. The message, its publication and the colocated teacher's counterpart
live in :mod:`asyncopd.references`.

This module does not score anything; the scorers are in
:mod:`asyncopd.teacher.scorer` and :mod:`asyncopd.teacher.http`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from asyncopd.config import JobConfig
from asyncopd.references import PromptIds, make_reference, generate_with_hf, held_out_prompts, publish
from asyncopd.transport.discovery import Rendezvous
from asyncopd.types import TeacherReference

__all__ = ["generate_with_server", "publish_references"]


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
            references.append(make_reference(index, ids, list(choice.token_ids)[:max_new_tokens], reason))
    return references


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
        prompts = held_out_prompts(cfg, tokenizer)
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
    publish(cfg, rendezvous, references, skipped, who="teacher 0")
