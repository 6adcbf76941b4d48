"""How the actor's vLLM engine is configured and built, on the CPU build and on CUDA.

:class:`asyncopd.actor.engine.VllmEngine` drives the engine step by step; this
module decides everything fixed before the first step: the environment the
launcher sets (:func:`engine_environment`), the checks of this process
(:func:`check_environment`), the ``EngineArgs`` (:func:`build_engine`; the
device-dependent ones come from :func:`asyncopd.placement.vllm_device_args`), the
model's parameter shapes read from its config (:func:`describe_model`) and the
``SamplingParams`` of every request (:func:`sampling_params_factory`). It also
silences three vLLM log records that would bury the console, and installs the
shortcuts of :mod:`asyncopd.actor.vllm_shortcuts` on every engine it builds.

On CPU a prompt's prefill is never split across engine steps (no chunked prefill):
vLLM would rewind a split request's seeded generator, which CPU generators cannot
do. Seeded sampling therefore works at any ``actor.max_num_seqs`` and prompt length.

This module does not touch ``os.environ`` (it reads it) and holds no engine state.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from asyncopd.actor.weight_receiver import EXTENSION_QUALNAME
from asyncopd.config import ActorConfig
from asyncopd.placement import RankPlacement, vllm_device_args

if TYPE_CHECKING:  # vLLM takes seconds to import; only build_engine needs it.
    from vllm.v1.engine.llm_engine import LLMEngine

__all__ = ["build_engine", "check_environment", "describe_model", "engine_environment", "fix_malloc_mmap_threshold", "max_batched_tokens",
           "sampling_params_factory"]

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
    The engine turns it off on CPU (see build_engine); tests/integration check the
    result token by token against an HF forward and for seeded reproducibility."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "does not officially support disabling chunked prefill" not in record.getMessage()


logging.getLogger("vllm.engine.arg_utils").addFilter(_ChunkedPrefillOffFilter())


class _PrefixCacheResetFilter(logging.Filter):
    """vLLM logs "Successfully reset prefix cache" at every reset, and the engine resets
    after every weight load (the KV of the old weights must go): one console line per
    policy version, and the costliest part of the reset (formatting and writing the
    record). A failed reset still warns, and the engine raises on it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "Successfully reset prefix cache"


logging.getLogger("vllm.v1.core.block_pool").addFilter(_PrefixCacheResetFilter())

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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def fix_malloc_mmap_threshold(threshold: int | None) -> bool:
    """Pin glibc's mmap threshold at ``threshold`` bytes (``actor.malloc_mmap_threshold``).

    glibc starts it at 128 KiB and raises it, up to 32 MiB, each time a large mmapped
    block is freed; from then on blocks of that size come from the heap arena, and the
    engine's varying kernel and activation buffers leave it holes that are never given
    back: the actor's RSS rose ~80 MB/h as free space inside the arena
    (bench/results/soak.txt). A pinned threshold keeps large blocks mmapped (returned on
    free). Returns whether it was applied: None, or a C library without ``mallopt``
    (not glibc), leaves malloc as it is.
    """
    if threshold is None:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("actor.malloc_mmap_threshold=%d ignored: this C library has no mallopt", threshold)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def check_environment(cfg: ActorConfig, head_dim: int) -> None:
    """Refuse (or fix) a process that is not set up for an in-process engine of ``cfg``."""
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
                       os.environ["VLLM_CPU_KVCACHE_SPACE"], cfg.kv_cache_gib)
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


def describe_model(model_path: str) -> tuple[dict[str, tuple[int, ...]], bool, int, int]:
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


def build_engine(model_path: str, cfg: ActorConfig, *, dtype: str, seed: int, max_logprobs: int,
                  placement: RankPlacement | None = None) -> LLMEngine:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    on_cuda = torch.cuda.is_available()
    if not on_cuda:
        _choose_cpu_gemm(cfg.cpu_gemm)
    args = EngineArgs(
        model=model_path,
        dtype=dtype,
        seed=seed,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        enforce_eager=cfg.enforce_eager,
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
        # The KV size, and on GPU tensor parallelism and the memory share.
        **vllm_device_args(placement, kv_cache_gib=cfg.kv_cache_gib),
    )
    engine = LLMEngine.from_engine_args(args)
    _cache_eos_token_id(engine)
    _install_shortcuts(engine)
    return engine


def _install_shortcuts(engine: LLMEngine) -> None:
    """The checked shortcuts through vLLM's per-request Python (asyncopd.actor.vllm_shortcuts)."""
    from asyncopd.actor import vllm_shortcuts

    vllm_shortcuts.install_flat_logprobs_append()
    ids = "counter request ids" if vllm_shortcuts.install_counter_request_ids(engine) else "vLLM's request ids"
    draws = engine.collective_rpc(vllm_shortcuts.install_seeded_draws)[0]
    logger.info("vLLM shortcuts: %s, flat log-prob appends, %s", draws, ids)


def _cache_eos_token_id(engine: LLMEngine) -> None:
    """vLLM's input processor asks its renderer for the tokenizer's EOS id at every added
    request, which goes through a tokenizer-pool borrow and transformers' ``__getattr__``
    (15% of adding a request, ~1.5% of the demo actor's CPU in a job). The id is fixed
    once the tokenizer is loaded: answer it from a cache. A vLLM without that renderer
    method is left as it is."""
    renderer = getattr(getattr(engine, "input_processor", None), "renderer", None)
    if renderer is None or not callable(getattr(renderer, "get_eos_token_id", None)):
        return
    eos_token_id = renderer.get_eos_token_id()
    renderer.get_eos_token_id = lambda: eos_token_id


def _choose_cpu_gemm(kind: str) -> None:
    """actor.cpu_gemm: ``plain`` makes vLLM's CPU linear layers skip the oneDNN handle
    (its dispatch then keeps the weight and calls torch's ``linear``); ``packed`` restores
    vLLM's own choice. vLLM decides per layer, at load and at every weight reload, from
    this module flag of its ops, so the choice holds for the whole process."""
    from vllm import _custom_ops as ops

    if not hasattr(ops, "_asyncopd_supports_onednn"):
        ops._asyncopd_supports_onednn = ops._supports_onednn  # what this build offers
    ops._supports_onednn = ops._asyncopd_supports_onednn and kind == "packed"


def max_batched_tokens(cfg: ActorConfig) -> int:
    """Tokens one engine step may process: vLLM's default (2,048), raised to hold a
    whole max_model_len sequence (a prefill is never split) and max_num_seqs decodes."""
    return max(2048, cfg.max_model_len, cfg.max_num_seqs)


def sampling_params_factory(cfg: ActorConfig, top_k: int) -> Any:
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
            # A request reports once, when it finished, with all its tokens, log-probs and
            # weight-version spans: no output objects (nor log-prob slices) for the requests
            # still running at every step (per-request Python on every engine step).
            output_kind=RequestOutputKind.FINAL_ONLY,
            # One fresh object per request, never reused: vLLM may then skip its deep copy,
            # which was 40% of the cost of adding a request.
            skip_clone=True,
        )

    return make
