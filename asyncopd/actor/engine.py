"""The actor's vLLM engine, run in-process and stepped by hand.

:class:`VllmEngine` wraps vLLM's V1 ``LLMEngine`` (continuous batching) so that the
actor loop decides what happens between two engine steps: which prompts are admitted
(:meth:`VllmEngine.add`), when one step runs (:meth:`VllmEngine.step`) and when new
weights are applied (:meth:`VllmEngine.load_weights`). Every generated token comes
back with its behaviour log-prob (the log-prob under the distribution actually
sampled: temperature and top-p applied, vLLM's ``processed_logprobs``) and the
``policy_version`` of the step that produced it (vLLM labels each token with the
engine's weight version, set by :meth:`VllmEngine.step`; a request is reported once,
when it finishes, ``RequestOutputKind.FINAL_ONLY``, so no per-step output objects are
built for the requests still running). With ``top_k > 0`` (teacher.top_k)
sampled requests also return the k most likely ids of that distribution at every
position (vLLM ``logprobs=k``), for top-k distillation. :meth:`VllmEngine.add_scoring`
scores a given response instead of sampling one (teacher-forced, vLLM
``prompt_logprobs``): the evaluation's NLL of the teacher's own samples.

Weights are loaded in place, inside the worker, by the loader chosen once per engine
(:mod:`asyncopd.actor.weight_loading`: vLLM's ``load_weights`` copying into the live
parameters with ``actor.cpu_gemm=plain`` on CPU, vLLM's layerwise ``reload_weights``
otherwise), after the whole payload has been checked against the model's parameter
names and shapes: a reload that fails half-way leaves layers on the meta device and
kills the engine.
After every load the KV cache is dropped, and requests in flight are re-prefilled
with the new weights, so every token is sampled from exactly one policy version.
In a job, weights arrive by :meth:`VllmEngine.receive_weights`: the engine's worker
receives them from the learner itself (:mod:`asyncopd.actor.weight_receiver`, a vLLM
worker extension), so no copy of the model passes through this process's frontend.

How the engine is configured and built (engine and sampling arguments, CPU/GPU
differences, checks of the process) lives in :mod:`asyncopd.actor.vllm_setup`; the
shortcuts it installs through vLLM's per-request Python (seeded draws, log-prob appends,
request ids; each checked to give vLLM's exact result) in :mod:`asyncopd.actor.vllm_shortcuts`.

This module does not tokenize, talk to other roles, compute rewards or decide
admission (staleness); that is the actor loop's job. It does not touch
``os.environ`` either: :func:`engine_environment` says what the launcher must set
before the engine is built (in particular ``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
tensors handed to an engine in another process would be serialised, and mangled).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from asyncopd.actor.completions import Completion, Finished, PendingRequest, complete_all
from asyncopd.actor.vllm_setup import (build_engine, check_environment, describe_model, engine_environment,
                                       fix_malloc_mmap_threshold,
                                       max_batched_tokens, sampling_params_factory)
from asyncopd.config import ActorConfig
from asyncopd.placement import RankPlacement
from asyncopd.transport import codec
from asyncopd.types import WeightUpdate

if TYPE_CHECKING:  # vLLM takes seconds to import; only the engine itself needs it.
    from vllm.v1.engine.llm_engine import LLMEngine

__all__ = ["Completion", "VllmEngine", "WeightPayloadError", "engine_environment", "fix_malloc_mmap_threshold",
           "max_batched_tokens"]

logger = logging.getLogger(__name__)


_WARMUP_REQUEST_ID = "__asyncopd_warmup__"
_MAX_LISTED_PROBLEMS = 8


class WeightPayloadError(ValueError):
    """A weight payload that cannot be loaded; nothing was loaded and the engine is intact."""


def _tokens_input(prompt_ids: list[int]) -> Any:
    """The engine's input for a tokenized prompt: vLLM's rendered form (``TokensInput``),
    what its renderer would make of a ``TokensPrompt`` after checks this engine has
    already made (length, vocabulary; no truncation, no multimodal data). A
    ``TokensPrompt`` would take vLLM's deprecated raw-prompt path through the renderer,
    ~20% of adding a request."""
    from vllm.inputs import tokens_input

    return tokens_input(prompt_ids)


class VllmEngine:
    """One in-process vLLM engine sampling from the student; see the module docstring."""

    def __init__(self, model_path: str, cfg: ActorConfig, *, dtype: str = "float32", seed: int = 0,
                 top_k: int = 0, placement: RankPlacement | None = None) -> None:
        """``top_k`` (teacher.top_k): ids of the sampling distribution returned per sampled
        token, most likely first (0 = none). ``placement``: this actor's GPUs and memory
        share (asyncopd.placement); None or a CPU placement: today's CPU engine."""
        start = time.perf_counter()
        self._cfg = cfg
        self._pending: dict[str, PendingRequest] = {}
        self._tagged_version: int | None = None
        """The policy_version vLLM labels new tokens with (set_weight_version)."""
        self._dead_reason = ""
        self._expected_shapes, self._tied_embeddings, vocab_size, head_dim = describe_model(model_path)
        self._vocab_size = vocab_size
        if not 0 <= top_k <= vocab_size:
            raise ValueError(f"teacher.top_k={top_k}: must be in [0, {vocab_size}] (the student's vocabulary "
                             f"size). Fix: set teacher.top_k to at most {vocab_size}.")
        self.top_k = top_k
        check_environment(cfg, head_dim)
        # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op;
        # shutdown() puts the original back for whoever shares this process afterwards.
        self._torch_set_num_threads = torch.set_num_threads
        self._llm: LLMEngine | None = build_engine(model_path, cfg, dtype=dtype, seed=seed, max_logprobs=top_k,
                                                   placement=placement)
        self._sampling_params = sampling_params_factory(cfg, top_k)
        self.eos_token_id: int | None = self._engine.get_tokenizer().eos_token_id
        """Sampling this token ends a request with finish_reason "stop" (it is returned)."""
        choices = self._engine.collective_rpc("asyncopd_choose_weight_loader", args=(cfg.cpu_gemm,))
        self.weight_loader: str = choices[0][0]
        """How new weights enter the model: "in_place" or "reload" (asyncopd.actor.weight_loading)."""
        logger.info("weights load %s (%s)", self.weight_loader, choices[0][1])
        self._warm_up()
        self.startup_s = time.perf_counter() - start
        logger.info("vLLM engine for %s ready in %.1f s (max_num_seqs=%d, kv_cache_gib=%g)",
                    model_path, self.startup_s, cfg.max_num_seqs, cfg.kv_cache_gib)

    @property
    def max_prompt_tokens(self) -> int:
        """Longest prompt accepted: actor.max_model_len - actor.max_new_tokens."""
        return self._cfg.max_model_len - self._cfg.max_new_tokens

    @property
    def num_unfinished(self) -> int:
        """Requests added and not yet returned by :meth:`step` or :meth:`abort`."""
        return len(self._pending)

    def add(self, request_id: str, prompt_ids: Sequence[int], *, greedy: bool = False,
            seed: int | None = None, temperature: float | None = None) -> None:
        """Queue one request; it starts on a following :meth:`step` (continuous batching).

        ``greedy`` samples at temperature 0; ``seed`` makes the sampled tokens reproducible;
        ``temperature`` overrides ``actor.temperature`` for this request (evaluation samples
        at 1.0, so their log-probs are the student's own distribution).
        """
        prompt = self._checked_ids(request_id, prompt_ids)
        if len(prompt) > self.max_prompt_tokens:
            raise ValueError(
                f"request {request_id!r}: prompt of {len(prompt)} tokens exceeds the limit of "
                f"{self.max_prompt_tokens} (actor.max_model_len={self._cfg.max_model_len} - "
                f"actor.max_new_tokens={self._cfg.max_new_tokens}). Fix: raise actor.max_model_len "
                "or lower actor.max_new_tokens, or shorten the prompt; prompts are never truncated."
            )
        params = self._sampling_params(greedy=greedy, seed=seed, temperature=temperature)
        self._queue(request_id, prompt, params, PendingRequest(top_k=params.logprobs))

    def add_scoring(self, request_id: str, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> None:
        """Queue a teacher-forced scoring of ``response_ids`` after ``prompt_ids`` (vLLM
        ``prompt_logprobs``; the one token generated is thrown away). Its :class:`Completion`
        holds ``response_ids`` as ``token_ids``, the model's log-prob of each (raw logits,
        temperature 1) as ``logprobs``, and finish_reason "scored". prompt + response must
        hold at most actor.max_model_len - 1 tokens.
        """
        prompt = self._checked_ids(request_id, prompt_ids)
        response = [int(t) for t in response_ids]
        if not response or len(prompt) + len(response) > self._cfg.max_model_len - 1:
            raise ValueError(f"scoring request {request_id!r}: {len(prompt)} prompt + {len(response)} response "
                             f"tokens; the response must be non-empty and both together at most "
                             f"actor.max_model_len - 1 = {self._cfg.max_model_len - 1}. Fix: truncate the response.")
        full = self._checked_ids(request_id, prompt + response)
        params = self._sampling_params(greedy=True, seed=None, max_tokens=1, prompt_logprobs=0)
        self._queue(request_id, full, params, PendingRequest(top_k=0, scored=(len(prompt), full)))

    def _checked_ids(self, request_id: str, prompt_ids: Sequence[int]) -> list[int]:
        if request_id in self._pending or request_id == _WARMUP_REQUEST_ID:
            raise ValueError(f"request_id {request_id!r} is already in flight (or reserved). "
                             "Fix: use a unique id per request.")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError(f"request {request_id!r} has an empty prompt. Fix: give at least one token.")
        bad = [t for t in prompt if not 0 <= t < self._vocab_size]
        if bad:
            raise ValueError(f"request {request_id!r}: token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {self._vocab_size}). Fix: tokenize with the student's tokenizer.")
        return prompt

    def _queue(self, request_id: str, prompt: list[int], params: Any, pending: PendingRequest) -> None:
        self._engine.add_request(request_id, _tokens_input(prompt), params)
        self._pending[request_id] = pending

    def step(self, policy_version: int) -> list[Completion]:
        """Run one engine step; its tokens are tagged with ``policy_version``.

        Returns the requests that finished in this step.
        """
        if not self._pending:
            return []
        if policy_version != self._tagged_version:
            # vLLM labels every token with the engine's weight version and returns the
            # spans with the finished request (requests report only when they finish:
            # RequestOutputKind.FINAL_ONLY, no per-step output objects).
            self._engine.set_weight_version(str(policy_version))
            self._tagged_version = policy_version
        finished: list[Finished] = []
        for output in self._engine.step():
            pending = self._pending.get(output.request_id)
            if pending is None or not output.finished:  # the warm-up request, or one aborted meanwhile
                continue
            del self._pending[output.request_id]
            sample = output.outputs[0]
            spans = [(span.version, span.start) for span in sample.weight_versions or ()]
            finished.append(Finished(output.request_id, pending, str(sample.finish_reason), sample.token_ids,
                                     sample.logprobs, spans, output.prompt_logprobs))
        return complete_all(finished) if finished else []

    def abort(self, request_id: str) -> Completion:
        """Stop a request in flight and return what it generated so far (finish_reason "abort")."""
        pending = self._pending.pop(request_id, None)
        if pending is None:
            raise KeyError(f"request {request_id!r} is not in flight (finished, aborted or never added).")
        # vLLM's record of the request so far (FINAL_ONLY: nothing was reported yet), kept
        # under vLLM's internal id (ours plus a random suffix).
        processor = self._engine.output_processor
        internal_ids = processor.external_req_ids.get(request_id) or [request_id]
        state = processor.request_states.get(internal_ids[-1])
        if state is None:
            token_ids, flat, starts, prompt_flat = [], None, [], None
        else:
            token_ids = list(state.detokenizer.output_token_ids)
            flat, starts = state.logprobs_processor.logprobs, list(state.weight_version_starts)
            prompt_flat = state.logprobs_processor.prompt_logprobs
        self._engine.abort_request([request_id])
        return pending.complete(request_id, "abort", token_ids, flat, starts, prompt_flat)

    def abort_all(self) -> list[Completion]:
        """Abort every request in flight; returns their partial completions."""
        return [self.abort(request_id) for request_id in list(self._pending)]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> float:
        """Replace every weight in place with ``(HF parameter name, tensor)`` pairs; returns seconds.

        The payload must name every parameter of the model once (``lm_head.weight`` may be
        left out when the embeddings are tied; it is then taken from the embedding). It is
        checked before anything is loaded: a bad payload raises :class:`WeightPayloadError`
        and leaves the engine as it was. Requests in flight continue with the new weights,
        their KV recomputed.
        """
        start = time.perf_counter()
        items = self._checked_payload(named_tensors)
        self._write_weights("weight load", "restart the actor and check the payload that caused it",
                            "asyncopd_load_weights", args=(items,))
        elapsed = time.perf_counter() - start
        logger.debug("loaded %d tensors in %.3f s", len(items), elapsed)
        return elapsed

    def join_weight_group(self, store_host: str, store_port: int, prefix: str, first_group_rank: int,
                          group_size: int, timeout_s: float, carrier: str) -> None:
        """Make every worker of this engine a member of the weight group (blocks until
        all members joined); see :mod:`asyncopd.actor.weight_receiver`."""
        self._engine.collective_rpc("asyncopd_join_weight_group", args=(
            store_host, store_port, prefix, first_group_rank, group_size, timeout_s, carrier))

    def receive_weights(self, update: WeightUpdate) -> float:
        """Receive ``update`` from the weight group straight into the model, inside the
        vLLM worker(s); returns seconds. The plan is checked first (a bad one raises
        :class:`WeightPayloadError` with nothing received or loaded). Afterwards the KV
        cache is dropped and requests in flight are re-prefilled, as with :meth:`load_weights`."""
        start = time.perf_counter()
        payload = codec.encode(update)
        problems = [p for worker in self._engine.collective_rpc("asyncopd_check_update", args=(payload,))
                    for p in worker]
        if problems:
            listed = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
            raise WeightPayloadError(f"weight update {update.policy_version} refused, nothing loaded: {listed}. "
                                     "Fix: learner and actors must run the same student architecture.")
        self._write_weights("weight update", "restart the actor; see the learner's log for its side of the transfer",
                            "asyncopd_receive_weights", args=(payload,))
        return time.perf_counter() - start

    def _write_weights(self, what: str, fix: str, method: str, **rpc: Any) -> None:
        """Run the worker RPC ``method`` that writes new weights into the model, then drop
        the KV they invalidate. ``what`` and ``fix`` word the errors."""
        try:
            self._engine.collective_rpc(method, **rpc)
        except Exception as exc:
            # Layers may now sit on the meta device; any further step would die obscurely.
            self._llm = None
            self._dead_reason = f"a {what} failed half-way ({type(exc).__name__}: {exc})"
            raise RuntimeError(f"{self._dead_reason}; the engine is unusable. Fix: {fix}.") from exc
        # Cached and running KV were computed by the old weights; preempt the running
        # requests so they are re-prefilled (otherwise the reset is refused while any run).
        if not self._engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError(f"vLLM refused to reset its prefix cache after a {what}; "
                               "new tokens would attend to KV from the old weights.")

    def shutdown(self) -> None:
        """Release the engine (its KV cache and vLLM's own process group). Idempotent."""
        if getattr(self, "_llm", None) is None:
            return
        self.abort_all()
        self._engine.engine_core.shutdown()
        self._llm = None
        self._dead_reason = "it was shut down"
        torch.set_num_threads = self._torch_set_num_threads

    # -- internals -------------------------------------------------------------------

    @property
    def _engine(self) -> LLMEngine:
        if self._llm is None:
            raise RuntimeError(f"this VllmEngine is unusable: {self._dead_reason}. Fix: build a new one.")
        return self._llm

    def _warm_up(self) -> None:
        # With an explicit KV size and eager mode vLLM skips its warm-up forward, so the
        # first real step would pay for it (~2 s on CPU); pay it here instead.
        params = self._sampling_params(greedy=True, seed=None, max_tokens=2)
        self._engine.add_request(_WARMUP_REQUEST_ID, _tokens_input([0]), params)
        while self._engine.has_unfinished_requests():
            self._engine.step()
        self._engine.reset_prefix_cache()

    def _checked_payload(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
        items = list(named_tensors)
        problems: list[str] = []
        seen: dict[str, torch.Tensor] = {}
        for name, tensor in items:
            expected = self._expected_shapes.get(name)
            if expected is None:
                problems.append(f"unknown parameter name {name!r}")
            elif name in seen:
                problems.append(f"{name!r} appears twice")
            elif not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                problems.append(f"{name!r} is {type(tensor).__name__} "
                                f"{getattr(tensor, 'dtype', '')}, not a floating-point tensor")
            elif tuple(tensor.shape) != expected:
                problems.append(f"{name!r} has shape {tuple(tensor.shape)}, expected {expected}")
            elif tensor.is_meta:
                problems.append(f"{name!r} is a meta tensor (no data)")
            else:
                seen[name] = tensor
        if self._tied_embeddings and "lm_head.weight" not in seen and "model.embed_tokens.weight" in seen:
            # The logits kernel is packed separately from the embedding it is tied to; without
            # this entry it would keep the old weights.
            seen["lm_head.weight"] = seen["model.embed_tokens.weight"]
            items.append(("lm_head.weight", seen["lm_head.weight"]))
        missing = sorted(set(self._expected_shapes) - set(seen))
        if missing and not problems:
            problems.append(f"{len(missing)} parameters missing, e.g. {missing[:3]} "
                            "(a payload must hold every parameter of the model)")
        if problems:
            listed = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
            more = f" (and {len(problems) - _MAX_LISTED_PROBLEMS} more)" if len(problems) > _MAX_LISTED_PROBLEMS else ""
            raise WeightPayloadError(
                f"weight payload rejected, nothing loaded: {listed}{more}. Fix: send the student's "
                "Hugging Face named_parameters() (full, unsharded tensors) of the same architecture."
            )
        return items


