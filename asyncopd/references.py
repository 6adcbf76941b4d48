"""The teacher's own samples of the held-out prompts (the evaluation's references), made
with an in-process Hugging Face teacher, and their publication.

Whoever holds the teacher makes them once per job, at start-up and before the roles
connect: teacher rank 0 (:mod:`asyncopd.teacher.references`, which also samples from a
``vllm_http`` server), or learner rank 0 when the teacher runs in the learner
(``teacher.backend=colocated``)::

    held-out prompts ─tokenize (student tokenizer, as the actors do)─> teacher samples
        (T=1, top-k/top-p off, seed = actor.seed, up to actor.max_new_tokens)
        ─TeacherReferences─> rendezvous store "eval/teacher_references"
              ├─> actors: score them with the student at every eval (NLL of teacher samples)
              └─> learner rank 0: how many eval_reference results to expect

Shared by two roles, so it imports neither (only config, types, transport and tasks).
This module does not score anything and talks to no server.
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

__all__ = ["PromptIds", "cut_at_eos", "fit_for_scoring", "generate_with_hf", "held_out_prompts", "make_reference",
           "publish_hf_references", "publish"]

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
            fitted.append(make_reference(r.prompt_index, r.prompt_ids.tolist(), r.response_ids[:room].tolist(),
                                     r.finish_reason))
    return fitted


def make_reference(index: int, prompt: list[int], response: list[int], finish_reason: str) -> TeacherReference:
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
    ``max_batch_tokens`` (prompt + response) tokens; batch ``b`` is seeded ``seed + b``.
    The caller's random state is left as it was (a learner keeps its own stream)."""
    from transformers import GenerationConfig

    eos_ids = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=0)
    # use_cache: a colocated teacher turns the KV cache off for its scoring forwards.
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                              eos_token_id=sorted(eos_ids) or None, pad_token_id=pad, use_cache=True)
    longest = max((len(ids) for _, ids in prompts), default=1)
    rows = max(1, max_batch_tokens // (longest + max_new_tokens))
    device = next(model.parameters()).device
    references = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for b, start in enumerate(range(0, len(prompts), rows)):
            references.extend(_sample_batch(model, prompts[start : start + rows], config, eos_ids, pad,
                                            seed=seed + b, device=device))
    return references


def _sample_batch(model: Any, batch: Sequence[PromptIds], config: Any, eos_ids: set[int], pad: int, *,
                  seed: int, device: torch.device) -> list[TeacherReference]:
    """One seeded ``generate`` of a left-padded batch, each row cut at its first EOS."""
    references = []
    width = max(len(ids) for _, ids in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    for row, (_, ids) in enumerate(batch):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        attention[row, width - len(ids):] = 1
    torch.manual_seed(seed)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                         generation_config=config)
    for row, (index, ids) in enumerate(batch):
        response, reason = cut_at_eos(out[row, width:].tolist(), eos_ids, config.max_new_tokens)
        references.append(make_reference(index, ids, response, reason))
    return references


def held_out_prompts(cfg: JobConfig, tokenizer: Any) -> list[PromptIds]:
    from asyncopd.tasks import load_task

    task = load_task(cfg.task, tokenizer=tokenizer,
                     max_prompt_tokens=cfg.actor.max_model_len - cfg.actor.max_new_tokens)
    prompts = task.eval_prompts()
    if not prompts:
        return []
    encoded = tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]
    return [(p.index, list(ids)) for p, ids in zip(prompts, encoded)]


def publish(cfg: JobConfig, rendezvous: Rendezvous, references: list[TeacherReference], skipped: str | None,
            *, who: str) -> None:
    """Publish the references fitted to the actors' model length, or why there are none;
    ``who`` names the publishing rank in the log ("teacher 0", "learner 0")."""
    references = fit_for_scoring(references, cfg.actor.max_model_len)
    message = TeacherReferences(policy_version=0, references=references, skipped_reason=skipped)
    rendezvous.publish_bytes(TEACHER_REFERENCES_KEY, codec.encode(message))
    if skipped:
        logger.warning("%s: no teacher samples of the held-out prompts: %s; evaluations skip the NLL of "
                       "teacher samples and compare the student's diversity with its own start", who, skipped)
    else:
        lengths = [r.response_ids.shape[0] for r in references]
        logger.info("%s: sampled %d held-out references (mean %.1f tokens) for the evaluation", who,
                    len(references), float(np.mean(lengths)) if lengths else 0.0)


def publish_hf_references(cfg: JobConfig, rendezvous: Rendezvous, model: Any, tokenizer: Any, *, who: str) -> None:
    """Sample the references with an in-process HF ``model`` (``tokenizer``: the
    student's) and publish them; with eval.teacher_samples=false publish why there are none."""
    if not cfg.eval.teacher_samples:
        publish(cfg, rendezvous, [], "eval.teacher_samples=false", who=who)
        return
    references = generate_with_hf(model, tokenizer, held_out_prompts(cfg, tokenizer),
                                  max_new_tokens=cfg.actor.max_new_tokens, seed=cfg.actor.seed,
                                  max_batch_tokens=cfg.teacher.max_batch_tokens)
    publish(cfg, rendezvous, references, None, who=who)
