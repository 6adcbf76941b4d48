"""The actor's vLLM engine, run in-process and stepped by hand.

:class:`VllmEngine` wraps vLLM's V1 ``LLMEngine`` (continuous batching) so that the
actor loop decides what happens between two engine steps: which prompts are admitted
(:meth:`VllmEngine.add`), when one step runs (:meth:`VllmEngine.step`) and when new
weights are applied (:meth:`VllmEngine.load_weights`). Every generated token comes
back with its behaviour log-prob (the log-prob under the distribution actually
sampled: temperature and top-p applied, vLLM's ``processed_logprobs``) and the
``policy_version`` of the step that produced it. With ``top_k > 0`` (teacher.top_k)
sampled requests also return the k most likely ids of that distribution at every
position (vLLM ``logprobs=k``), for top-k distillation. :meth:`VllmEngine.add_scoring`
scores a given response instead of sampling one (teacher-forced, vLLM
``prompt_logprobs``): the evaluation's NLL of the teacher's own samples.

Weights are loaded in place through the worker's ``reload_weights`` (vLLM's
layerwise reload, the one path that works on the CPU build as well as on CUDA), after
the whole payload has been checked against the model's parameter names and shapes: a
reload that fails half-way leaves layers on the meta device and kills the engine.
After every load the KV cache is dropped, and requests in flight are re-prefilled
with the new weights, so every token is sampled from exactly one policy version.
In a job, weights arrive by :meth:`VllmEngine.receive_weights`: the engine's worker
receives them from the learner itself (:mod:`asyncopd.actor.weight_receiver`, a vLLM
worker extension), so no copy of the model passes through this process's frontend.

On CPU a prompt's prefill is never split across engine steps (no chunked prefill):
vLLM would rewind a split request's seeded generator, which CPU generators cannot
do. Seeded sampling therefore works at any ``actor.max_num_seqs`` and prompt length.

This module does not tokenize, talk to other roles, compute rewards or decide
admission (staleness); that is the actor loop's job. It does not touch
``os.environ`` either: :func:`engine_environment` says what the launcher must set
before the engine is built (in particular ``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
tensors handed to an engine in another process would be serialised, and mangled).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from asyncopd.actor.weight_receiver import EXTENSION_QUALNAME
from asyncopd.config import ActorConfig
from asyncopd.placement import EXCLUSIVE_ENGINE_FRACTION, RankPlacement
from asyncopd.transport import codec
from asyncopd.types import WeightUpdate

if TYPE_CHECKING:  # vLLM takes seconds to import; only the engine itself needs it.
    from vllm.v1.engine.llm_engine import LLMEngine

__all__ = ["Completion", "VllmEngine", "WeightPayloadError", "engine_environment", "max_batched_tokens"]

logger = logging.getLogger(__name__)


class _RotaryReloadFilter(logging.Filter):
    """vLLM's in-place weight reload warns "RotaryEmbedding: Failed to load weights"
    on every load: the rotary cos/sin cache is computed from the config, is never
    in a checkpoint or a weight payload, and vLLM keeps it as it is. Drop exactly
    that record (once per policy version it would bury the console)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_RotaryReloadFilter())


class _ChunkedPrefillOffFilter(logging.Filter):
    """vLLM warns that "This model does not officially support disabling chunked prefill"
    for every generating model when chunked prefill is turned off, whatever the model.
    The engine turns it off on CPU (see _build_engine); tests/integration check the
    result token by token against an HF forward and for seeded reproducibility."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "does not officially support disabling chunked prefill" not in record.getMessage()


logging.getLogger("vllm.engine.arg_utils").addFilter(_ChunkedPrefillOffFilter())

_WARMUP_REQUEST_ID = "__asyncopd_warmup__"
_MAX_LISTED_PROBLEMS = 8


def engine_environment(threads: int, *, onednn_cache_capacity: int | None = None) -> dict[str, str]:
    """Environment variables the launcher sets before a :class:`VllmEngine` is built.

    ``threads`` is the number of compute threads of the engine (``cluster.actor_threads``);
    ``onednn_cache_capacity`` (``actor.onednn_cache_capacity``) bounds oneDNN's cache of
    compiled GEMM kernels (None: oneDNN's default). On CUDA machines only the in-process
    switch is returned.
    """
    if threads < 1:
        raise ValueError(f"threads={threads}: an engine needs at least one thread. Fix: pass threads >= 1.")
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in-process: weights are passed by reference
    if not torch.cuda.is_available():
        # In-process, vLLM's own core binding never runs (it lives in the multiprocess
        # executor); "nobind" says so explicitly, and the OpenMP pool size is ours.
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        env["OMP_NUM_THREADS"] = str(threads)
        if onednn_cache_capacity is not None:
            # vLLM's CPU linear layers compile a oneDNN kernel per token count; the cache
            # holding them is what grew the actor's memory for tens of minutes (issue 10).
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(onednn_cache_capacity)
    return env


class WeightPayloadError(ValueError):
    """A weight payload that cannot be loaded; nothing was loaded and the engine is intact."""


@dataclass(slots=True)
class Completion:
    """One finished request. All arrays share the length of ``token_ids``."""

    request_id: str
    token_ids: np.ndarray
    """int32 [n]: the generated tokens, the final EOS included when finish_reason is "stop"."""
    logprobs: np.ndarray
    """float32 [n]: behaviour log-prob of each token under the distribution it was sampled from."""
    token_policy_versions: np.ndarray
    """int32 [n]: the policy_version of the weights that produced each token."""
    finish_reason: str
    """"stop" (EOS sampled), "length" (max_new_tokens reached) or "abort"."""
    topk_ids: np.ndarray | None = None
    """int32 [n, k]: the k most likely ids of the sampling distribution at each position,
    most likely first; None when the engine's top_k is 0 and for greedy requests."""


@dataclass(slots=True)
class _Pending:
    top_k: int
    """Top-k ids recorded per token (0: none)."""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)
    topk_ids: list[list[int]] = field(default_factory=list)
    scored: tuple[int, list[int]] | None = None
    """Scoring requests: (prompt length, prompt + response ids)."""
    prompt_logprobs: list[float] = field(default_factory=list)
    """Scoring requests: the log-prob of prompt+response token p (p >= 1), at index p - 1."""

    def take_prompt_logprobs(self, flat: Any, request_id: str) -> None:
        """Record vLLM's ``FlatLogprobs`` of the prompt positions (the first one is empty)."""
        assert self.scored is not None
        all_ids = self.scored[1]
        for position in range(len(flat)):
            start, end = flat.start_indices[position], flat.end_indices[position]
            if start == end:
                continue
            index = len(self.prompt_logprobs) + 1
            if flat.token_ids[start] != all_ids[index]:
                raise RuntimeError(f"vLLM's prompt log-probs for {request_id!r} name token {flat.token_ids[start]} "
                                   f"at position {index}, where the scored sequence holds {all_ids[index]}.")
            self.prompt_logprobs.append(flat.logprobs[start])

    def extend(self, new_ids: Sequence[int], flat: Any, request_id: str) -> None:
        """Record one step's tokens from vLLM's ``FlatLogprobs`` of those positions.

        Each position holds the sampled token first (its rank may be anything), then the
        top-k ids with ranks 1..k, most likely first; checked, so that a change of that
        layout fails here instead of feeding wrong ids to the teacher.
        """
        k, ranks = self.top_k, list(range(1, self.top_k + 1))
        for position, token_id in enumerate(new_ids):
            start, end = flat.start_indices[position], flat.end_indices[position]
            if flat.token_ids[start] != token_id or flat.ranks[start + 1 : end] != ranks:
                raise RuntimeError(
                    f"vLLM's log-probs for {request_id!r} do not hold the sampled token {token_id} followed by "
                    f"ranks 1..{k} (got ids {flat.token_ids[start:end]}, ranks {flat.ranks[start:end]}); "
                    f"SamplingParams(logprobs={k}, flat_logprobs=True) was not honoured.")
            self.logprobs.append(flat.logprobs[start])
            if k:
                self.topk_ids.append(flat.token_ids[start + 1 : end])
        self.token_ids.extend(new_ids)

    def complete(self, request_id: str, finish_reason: str) -> Completion:
        if self.scored is not None:
            prompt_len, all_ids = self.scored
            response = all_ids[prompt_len:]
            if len(self.prompt_logprobs) != prompt_len + len(response) - 1:
                raise RuntimeError(f"scoring request {request_id!r} finished with {len(self.prompt_logprobs)} "
                                   f"prompt log-probs, expected {prompt_len + len(response) - 1}.")
            version = self.policy_versions[0] if self.policy_versions else 0
            return Completion(
                request_id=request_id, token_ids=np.asarray(response, dtype=np.int32),
                logprobs=np.asarray(self.prompt_logprobs[prompt_len - 1:], dtype=np.float32),
                token_policy_versions=np.full(len(response), version, dtype=np.int32), finish_reason="scored")
        return Completion(
            request_id=request_id,
            token_ids=np.asarray(self.token_ids, dtype=np.int32),
            logprobs=np.asarray(self.logprobs, dtype=np.float32),
            token_policy_versions=np.asarray(self.policy_versions, dtype=np.int32),
            finish_reason=finish_reason,
            topk_ids=np.asarray(self.topk_ids, dtype=np.int32).reshape(-1, self.top_k) if self.top_k else None,
        )


class VllmEngine:
    """One in-process vLLM engine sampling from the student; see the module docstring."""

    def __init__(self, model_path: str, cfg: ActorConfig, *, dtype: str = "float32", seed: int = 0,
                 top_k: int = 0, placement: RankPlacement | None = None) -> None:
        """``top_k`` (teacher.top_k): ids of the sampling distribution returned per sampled
        token, most likely first (0 = none). ``placement``: this actor's GPUs and memory
        share (asyncopd.placement); None or a CPU placement: today's CPU engine."""
        start = time.perf_counter()
        self._cfg = cfg
        self._pending: dict[str, _Pending] = {}
        self._dead_reason = ""
        self._expected_shapes, self._tied_embeddings, vocab_size, head_dim = _describe_model(model_path)
        self._vocab_size = vocab_size
        if not 0 <= top_k <= vocab_size:
            raise ValueError(f"teacher.top_k={top_k}: must be in [0, {vocab_size}] (the student's vocabulary "
                             f"size). Fix: set teacher.top_k to at most {vocab_size}.")
        self.top_k = top_k
        self._check_environment(head_dim)
        # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op;
        # shutdown() puts the original back for whoever shares this process afterwards.
        self._torch_set_num_threads = torch.set_num_threads
        self._llm: LLMEngine | None = _build_engine(model_path, cfg, dtype=dtype, seed=seed, max_logprobs=top_k,
                                                    placement=placement)
        self._sampling_params = _sampling_params_factory(cfg, top_k)
        self.eos_token_id: int | None = self._engine.get_tokenizer().eos_token_id
        """Sampling this token ends a request with finish_reason "stop" (it is returned)."""
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
        self._queue(request_id, prompt, params, _Pending(top_k=params.logprobs))

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
        self._queue(request_id, full, params, _Pending(top_k=0, scored=(len(prompt), full)))

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

    def _queue(self, request_id: str, prompt: list[int], params: Any, pending: _Pending) -> None:
        from vllm.inputs import TokensPrompt

        self._engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt), params)
        self._pending[request_id] = pending

    def step(self, policy_version: int) -> list[Completion]:
        """Run one engine step; its tokens are tagged with ``policy_version``.

        Returns the requests that finished in this step.
        """
        if not self._pending:
            return []
        finished: list[Completion] = []
        for output in self._engine.step():
            pending = self._pending.get(output.request_id)
            if pending is None:  # the warm-up request, or one aborted meanwhile
                continue
            sample = output.outputs[0]
            new_ids = sample.token_ids  # DELTA: only this step's tokens
            if sample.logprobs is None or len(sample.logprobs) != len(new_ids):
                raise RuntimeError(f"vLLM returned {len(new_ids)} tokens for {output.request_id!r} without "
                                   "one log-prob each; SamplingParams(logprobs=0) was not honoured.")
            if pending.scored is not None and output.prompt_logprobs:
                pending.take_prompt_logprobs(output.prompt_logprobs, output.request_id)
            pending.extend(new_ids, sample.logprobs, output.request_id)
            pending.policy_versions.extend([policy_version] * len(new_ids))
            if output.finished:
                del self._pending[output.request_id]
                finished.append(pending.complete(output.request_id, str(sample.finish_reason)))
        return finished

    def abort(self, request_id: str) -> Completion:
        """Stop a request in flight and return what it generated so far (finish_reason "abort")."""
        pending = self._pending.pop(request_id, None)
        if pending is None:
            raise KeyError(f"request {request_id!r} is not in flight (finished, aborted or never added).")
        self._engine.abort_request([request_id])
        return pending.complete(request_id, "abort")

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
        engine = self._engine
        try:
            engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items)})
        except Exception as exc:
            # Layers may now sit on the meta device; any further step would die obscurely.
            self._llm = None
            self._dead_reason = f"a weight reload failed half-way ({type(exc).__name__}: {exc})"
            raise RuntimeError(f"{self._dead_reason}; the engine is unusable. Fix: restart the actor "
                               "and check the payload that caused it.") from exc
        # Cached and running KV were computed by the old weights; preempt the running
        # requests so they are re-prefilled (otherwise the reset is refused while any run).
        if not self._engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight load; "
                               "new tokens would attend to KV from the old weights.")
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
        try:
            self._engine.collective_rpc("asyncopd_receive_weights", args=(payload,))
        except Exception as exc:
            self._llm = None
            self._dead_reason = f"a weight update failed half-way ({type(exc).__name__}: {exc})"
            raise RuntimeError(f"{self._dead_reason}; the engine is unusable. Fix: restart the actor; see "
                               "the learner's log for its side of the transfer.") from exc
        if not self._engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight update; "
                               "new tokens would attend to KV from the old weights.")
        return time.perf_counter() - start

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

    def _check_environment(self, head_dim: int) -> None:
        from vllm import envs

        if envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            raise RuntimeError(
                "VLLM_ENABLE_V1_MULTIPROCESSING is on, but VllmEngine hands tensors to the engine by "
                "reference and needs it in-process. Fix: set the variables of "
                "asyncopd.actor.engine.engine_environment() before building the engine."
            )
        if torch.cuda.is_available():
            return
        if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            logger.warning("VLLM_CPU_KVCACHE_SPACE=%s overrides actor.kv_cache_gib=%g; unset it to use the config.",
                           os.environ["VLLM_CPU_KVCACHE_SPACE"], self._cfg.kv_cache_gib)
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim not in supported:
            raise ValueError(
                f"the model's attention head_dim={head_dim} is not supported by vLLM's CPU attention "
                f"(supported: {supported}); its first forward would fail. Fix: use a model whose "
                "hidden_size / num_attention_heads is one of those sizes."
            )
        threads = os.environ.get("OMP_NUM_THREADS")
        if threads and threads.isdigit() and torch.get_num_threads() != int(threads):
            # torch read OMP_NUM_THREADS when it was imported, which may predate the launcher
            # setting it; the engine computes in this process's intra-op pool.
            torch.set_num_threads(int(threads))

    def _warm_up(self) -> None:
        # With an explicit KV size and eager mode vLLM skips its warm-up forward, so the
        # first real step would pay for it (~2 s on CPU); pay it here instead.
        from vllm.inputs import TokensPrompt

        params = self._sampling_params(greedy=True, seed=None, max_tokens=2)
        self._engine.add_request(_WARMUP_REQUEST_ID, TokensPrompt(prompt_token_ids=[0]), params)
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


def _describe_model(model_path: str) -> tuple[dict[str, tuple[int, ...]], bool, int, int]:
    """Parameter shapes by HF name, tied embeddings, vocab size and head dim, from the config alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    text_config = config.get_text_config()
    tied = bool(getattr(text_config, "tie_word_embeddings", False))
    if tied and "lm_head.weight" not in shapes and "model.embed_tokens.weight" in shapes:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return shapes, tied, int(text_config.vocab_size), int(head_dim)


def _build_engine(model_path: str, cfg: ActorConfig, *, dtype: str, seed: int, max_logprobs: int,
                  placement: RankPlacement | None = None) -> LLMEngine:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    on_cuda = torch.cuda.is_available()
    args = EngineArgs(
        model=model_path,
        dtype=dtype,
        seed=seed,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        enforce_eager=cfg.enforce_eager,
        # An explicit KV size: vLLM's CPU worker otherwise sizes it from the NUMA node's
        # memory and refuses to start on machines that under-report it.
        # On GPU, vLLM sizes it from gpu_memory_utilization (gpu_engine_args).
        kv_cache_memory_bytes=None if gpu_engine_args(placement) else int(cfg.kv_cache_gib * 2**30),
        logprobs_mode="processed_logprobs",  # the distribution actually sampled
        # On CPU, never split a prompt's prefill across steps. For a partially prefilled
        # request that carries a seed, vLLM rewinds the request's generator (set_offset),
        # which CPU generators cannot do ("CPU Generator does not use offset" killed the
        # actor, issue 8). Without chunking, a prompt that does not fit the step's
        # remaining token budget waits for the next step whole; the budget holds at least
        # one full sequence (vLLM requires it), so every prompt the engine accepts is
        # scheduled. CUDA generators can rewind: chunked prefill stays on there.
        enable_chunked_prefill=on_cuda,
        max_num_batched_tokens=None if on_cuda else max_batched_tokens(cfg),
        max_logprobs=max_logprobs,  # vLLM refuses logprobs=k above it (its default is 20)
        disable_log_stats=True,
        worker_extension_cls=EXTENSION_QUALNAME,  # the weight receiver, inside the worker
        **gpu_engine_args(placement),
    )
    return LLMEngine.from_engine_args(args)


def max_batched_tokens(cfg: ActorConfig) -> int:
    """Tokens one engine step may process: vLLM's default (2,048), raised to hold a
    whole max_model_len sequence (a prefill is never split) and max_num_seqs decodes."""
    return max(2048, cfg.max_model_len, cfg.max_num_seqs)


def gpu_engine_args(placement: RankPlacement | None) -> dict[str, Any]:
    """EngineArgs overrides on GPU: tensor parallelism over the placement's GPUs and
    the KV cache sized by its memory share (instead of actor.kv_cache_gib)."""
    if placement is None or placement.device_type != "cuda":
        return {}
    return {"tensor_parallel_size": placement.tensor_parallel_size,
            "gpu_memory_utilization": placement.memory_fraction or EXCLUSIVE_ENGINE_FRACTION}


def _sampling_params_factory(cfg: ActorConfig, top_k: int) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    def make(*, greedy: bool, seed: int | None, max_tokens: int | None = None,
             temperature: float | None = None, prompt_logprobs: int | None = None) -> SamplingParams:
        return SamplingParams(
            temperature=0.0 if greedy else (cfg.temperature if temperature is None else temperature),
            top_p=1.0 if greedy else cfg.top_p,
            max_tokens=max_tokens or cfg.max_new_tokens,
            seed=seed,
            # The sampled token's log-prob, plus the top-k for distillation (greedy
            # samples are only scored for accuracy).
            logprobs=0 if greedy else top_k,
            prompt_logprobs=prompt_logprobs,  # scoring requests: the log-prob of every prompt token
            flat_logprobs=True,  # flat lists instead of one dict of Logprob objects per token
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,  # each step reports only its own tokens
            # One fresh object per request, never reused: vLLM may then skip its deep copy,
            # which was 40% of the cost of adding a request.
            skip_clone=True,
        )

    return make
