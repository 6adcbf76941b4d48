"""Shortcuts through vLLM's per-request Python in the actor's engine, each checked to
produce exactly what the vLLM code it replaces produces (issue 8).

On the CPU demo most of the actor's CPU is not the model but vLLM's per-request,
per-step Python around it (bench/results/actor_cpu.txt). Three pieces of it do work
the actor does not need, in a way that is easy to replace with the same result:

seeded draws (worker, :func:`install_seeded_draws`)
    vLLM's CPU sampler (``TopKTopPSampler.forward_cpu``) takes one 31-bit seed per
    request and step from the request's own ``torch.Generator`` (seeded with
    ``SamplingParams.seed``): a ``torch.randint(..., (1,), generator=g).item()`` and a
    tensor element write per request, per engine step. A CPU generator yields the same
    numbers whether drawn one at a time or many at once, and nothing but this sampler
    draws from a request's generator on CPU (chunked prefill, whose rewinding CPU
    generators cannot do, is off: :mod:`asyncopd.actor.vllm_setup`). So each
    generator's draws are taken :data:`DRAWS_PER_REFILL` at a time and handed out in
    order (:class:`SeededDraws`); every request gets the same seeds, so samples do not
    change. The rest of ``forward_cpu`` is repeated as it is. Installed only on the CPU
    sampler, and only after a check on random logits gave the same tokens and
    log-probs as vLLM's own ``forward_cpu`` over several steps.
flat log-probs (process-wide, :func:`install_flat_logprobs_append`)
    The output processor appends every position's (sampled + top-k) ids, log-probs,
    ranks and decoded strings one element at a time into the request's
    ``FlatLogprobs``. Without detokenization (the actor's ``detokenize=False``) the same
    lists are extended in one call each. Any other case runs vLLM's own method.
request ids (frontend, :func:`install_counter_request_ids`)
    vLLM appends 8 random hex characters (``uuid4``: an ``os.urandom`` system call)
    to every request id to make it unique inside the engine; a per-engine counter
    makes it unique too. The suffix is vLLM's business only: outputs carry the id the
    actor gave (``external_req_id``).

Each shortcut replaces one attribute on one object (or one method of vLLM's
``LogprobsProcessor``) and can be taken back (``remove``); tests/unit/test_vllm_shortcuts.py
compares each with the vLLM code it replaces on the same inputs, and fails when
vLLM's internals move under them. This module decides nothing about what is sampled
and holds no engine state besides the draws of live generators.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["DRAWS_PER_REFILL", "SeededDraws", "install_counter_request_ids", "install_flat_logprobs_append",
           "install_seeded_draws", "remove_counter_request_ids", "remove_flat_logprobs_append",
           "remove_seeded_draws"]

logger = logging.getLogger(__name__)

DRAWS_PER_REFILL = 32
"""Seeds taken from a request's generator at once (a demo request needs at most
actor.max_new_tokens = 8; a longer one refills). Drawing 32 costs what drawing 1 does."""

_SEED_BOUND = 2**31  # vLLM's forward_cpu draws seeds in [0, 2**31)


class SeededDraws:
    """The next seeds of live ``torch.Generator`` objects, taken in blocks.

    ``take(generators)`` returns, for each generator in order, the value that
    ``torch.randint(0, 2**31, (1,), generator=g).item()`` would return next. Entries go
    with their generator (weak keys): a request's draws are dropped when vLLM drops it.
    """

    def __init__(self, per_refill: int = DRAWS_PER_REFILL) -> None:
        self.per_refill = per_refill
        self._left: weakref.WeakKeyDictionary[torch.Generator, list[int]] = weakref.WeakKeyDictionary()

    def take(self, generators: Iterable[torch.Generator]) -> list[int]:
        left, values = self._left, []
        for generator in generators:
            draws = left.get(generator)
            if not draws:
                draws = torch.randint(0, _SEED_BOUND, (self.per_refill,), generator=generator,
                                      dtype=torch.long).tolist()
                draws.reverse()  # pop() from the end hands them out in drawing order
                left[generator] = draws
            values.append(draws.pop())
        return values


def _forward_cpu_with_draws(sampler: Any, vllm_forward: Callable, draws: SeededDraws) -> Callable:
    """``TopKTopPSampler.forward_cpu`` of vLLM 0.32 with the per-request seeds from ``draws``."""
    from vllm.v1.sample.ops import topk_topp_sampler

    def forward_cpu(logits: torch.Tensor, generators: dict[int, torch.Generator], k: torch.Tensor | None,
                    p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not generators or sampler.use_fp64_gumbel:
            return vllm_forward(logits, generators, k, p)
        logits = topk_topp_sampler.apply_top_k_top_p(logits, k, p)
        logits_to_return = None
        if sampler.logprobs_mode == "processed_logits":
            logits_to_return = logits
        elif sampler.logprobs_mode == "processed_logprobs":
            logits_to_return = logits.log_softmax(dim=-1, dtype=torch.float32)
        # The unseeded rows' seeds come from the global generator, as in vLLM (the
        # same number of values, so the global stream stays where vLLM leaves it).
        seeds = torch.randint(0, _SEED_BOUND, (logits.shape[0],), dtype=torch.long)
        seeds[list(generators)] = torch.tensor(draws.take(generators.values()), dtype=torch.long)
        return torch.ops._C.fused_gumbel_argmax(logits.to(dtype=torch.float32), seeds), logits_to_return

    forward_cpu.asyncopd_seeded_draws = draws  # type: ignore[attr-defined]
    forward_cpu.asyncopd_vllm_forward = vllm_forward  # type: ignore[attr-defined]
    return forward_cpu


def _same_samples(vllm_forward: Callable, shortcut: Callable, vocab_size: int, steps: int = 3) -> str | None:
    """None if ``shortcut`` samples exactly like ``vllm_forward`` on random logits over
    ``steps`` steps of a batch with seeded and unseeded rows; else what differed."""
    batch = 6
    cpu_rng = torch.Generator().manual_seed(1234)
    gens_a = {i: torch.Generator().manual_seed(100 + i) for i in range(0, batch, 2)}
    gens_b = {i: torch.Generator().manual_seed(100 + i) for i in range(0, batch, 2)}
    state = torch.random.get_rng_state()
    try:
        for step in range(steps):
            logits = torch.randn(batch, vocab_size, generator=cpu_rng) * 3
            torch.manual_seed(step)
            ids_a, lp_a = vllm_forward(logits.clone(), gens_a, None, None)
            torch.manual_seed(step)
            ids_b, lp_b = shortcut(logits.clone(), gens_b, None, None)
            if not torch.equal(ids_a, ids_b):
                return f"step {step}: tokens {ids_b.tolist()} instead of vLLM's {ids_a.tolist()}"
            if (lp_a is None) != (lp_b is None) or (lp_a is not None and not torch.equal(lp_a, lp_b)):
                return f"step {step}: different processed log-probs"
    finally:
        torch.random.set_rng_state(state)
    return None


def install_seeded_draws(worker: Any) -> str:
    """Give the worker's CPU sampler :class:`SeededDraws` (see the module docstring).
    Called inside vLLM's worker (``collective_rpc``); returns one line for the log."""
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    sampler = worker.model_runner.sampler.topk_topp_sampler
    vllm_forward = sampler.forward
    if getattr(vllm_forward, "asyncopd_seeded_draws", None) is not None:
        return "seeded draws: already installed"
    if getattr(vllm_forward, "__func__", None) is not TopKTopPSampler.forward_cpu:
        runs = getattr(vllm_forward, "__qualname__", vllm_forward)
        return f"seeded draws: off (the sampler runs {runs}, not vLLM's CPU sampler)"
    vocab_size = int(worker.model_runner.model_config.get_vocab_size())
    # Checked with draws of its own: the installed shortcut starts with none taken.
    problem = _same_samples(vllm_forward, _forward_cpu_with_draws(sampler, vllm_forward, SeededDraws()),
                            vocab_size)
    if problem is not None:
        logger.warning("vLLM's CPU sampler no longer samples like asyncopd's copy of it (%s); keeping vLLM's "
                       "(slower per request). Update asyncopd/actor/vllm_shortcuts.py.", problem)
        return f"seeded draws: off ({problem})"
    sampler.forward = _forward_cpu_with_draws(sampler, vllm_forward, SeededDraws())
    return f"seeded draws: on ({DRAWS_PER_REFILL} per refill)"


def remove_seeded_draws(worker: Any) -> None:
    """Put vLLM's own sampler back (generators in flight would then draw at other offsets:
    only between batches)."""
    sampler = worker.model_runner.sampler.topk_topp_sampler
    vllm_forward = getattr(sampler.forward, "asyncopd_vllm_forward", None)
    if vllm_forward is not None:
        sampler.forward = vllm_forward


def _flat_append(vllm_update: Callable) -> Callable:
    from vllm.logprobs import FlatLogprobs

    def _update_sample_logprobs(self: Any, logprobs_lists: Any) -> None:
        flat, num_logprobs = self.logprobs, self.num_logprobs
        if (self.tokenizer is not None or type(flat) is not FlatLogprobs or num_logprobs is None
                or num_logprobs < 0 or self.cumulative_logprob is None):
            return vllm_update(self, logprobs_lists)
        token_ids_lst, logprobs_lst, ranks_lst, _ = logprobs_lists
        for rank_np, logprobs_np, token_ids_np in zip(ranks_lst, logprobs_lst, token_ids_lst):
            logprobs = logprobs_np.tolist()
            token_ids = token_ids_np.tolist()
            self.cumulative_logprob += logprobs[0]  # the sampled token's, as vLLM adds it
            # vLLM zips ids, log-probs and the ranks (sampled rank, 1..num_logprobs).
            n = min(len(token_ids), len(logprobs), num_logprobs + 1)
            start = len(flat.logprobs)
            flat.start_indices.append(start)
            if n:
                flat.token_ids.extend(token_ids[:n] if n < len(token_ids) else token_ids)
                flat.logprobs.extend(logprobs[:n] if n < len(logprobs) else logprobs)
                flat.ranks.append(rank_np.tolist())
                flat.ranks.extend(range(1, n))
                flat.decoded_tokens.extend([None] * n)
            flat.end_indices.append(start + n)

    _update_sample_logprobs.asyncopd_vllm_method = vllm_update  # type: ignore[attr-defined]
    return _update_sample_logprobs


def install_flat_logprobs_append() -> bool:
    """Extend each position's log-prob lists in one call each (process-wide, vLLM's
    ``LogprobsProcessor``); returns False if it already was."""
    from vllm.v1.engine.logprobs import LogprobsProcessor

    current = LogprobsProcessor._update_sample_logprobs
    if getattr(current, "asyncopd_vllm_method", None) is not None:
        return False
    LogprobsProcessor._update_sample_logprobs = _flat_append(current)
    return True


def remove_flat_logprobs_append() -> None:
    from vllm.v1.engine.logprobs import LogprobsProcessor

    vllm_update = getattr(LogprobsProcessor._update_sample_logprobs, "asyncopd_vllm_method", None)
    if vllm_update is not None:
        LogprobsProcessor._update_sample_logprobs = vllm_update


def install_counter_request_ids(engine: Any) -> bool:
    """Make ``engine``'s internal request ids unique with a counter instead of ``uuid4``
    (the engine's input processor only); returns False if vLLM has no such step."""
    processor = getattr(engine, "input_processor", None)
    vllm_assign = getattr(processor, "assign_request_id", None)
    if vllm_assign is None:
        return False
    counter = itertools.count()

    def assign_request_id(request: Any) -> None:
        if request.external_req_id is not None:  # vLLM's own check
            return vllm_assign(request)
        request.external_req_id = request.request_id
        request.request_id = f"{request.request_id}-{next(counter):x}"

    processor.assign_request_id = assign_request_id
    return True


def remove_counter_request_ids(engine: Any) -> None:
    processor = getattr(engine, "input_processor", None)
    if processor is not None and "assign_request_id" in vars(processor):
        del processor.assign_request_id
