"""``actor``: the vLLM engines that sample from the student.

Part of :mod:`asyncopd.config` (import from there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from asyncopd.config._base import _check_fraction, _check_positive, _fail


@dataclass(kw_only=True, slots=True)
class ActorConfig:
    """Sampling and engine settings of each vLLM actor."""

    samples_per_prompt: int = 1
    """Samples drawn per prompt (the GRPO group size n); OPD works with 1."""
    max_new_tokens: int = 8
    """Largest response length in tokens."""
    temperature: float = 1.0
    """Sampling temperature. The learner trains the T=1 distribution, so values other
    than 1 make the behaviour policy differ from the trained one (IS corrects it)."""
    top_p: float = 1.0
    """Nucleus sampling mass (1.0 = off)."""
    max_num_seqs: int = 128
    """Sequences the engine decodes at once (the continuous-batching width). On the
    toy CPU demo an engine step costs mostly per-step Python, so one wave per
    128-sample batch instead of two saved ~20% of the actor's generate CPU."""
    max_model_len: int = 64
    """Longest prompt+response the engine accepts, in tokens."""
    kv_cache_gib: float = 0.0625
    """KV-cache memory per engine in GiB."""
    enforce_eager: bool = True
    """Skip torch.compile / CUDA graphs (fast start-up; right for tiny models)."""
    seed: int = 0
    """Base seed of the sampler; each actor offsets it by its index."""
    gpu_memory_utilization: float | None = None
    """On GPU: the fraction (0, 1] of each of its GPUs' memory the engine may take
    (weights, activations, KV cache; vLLM's ``gpu_memory_utilization``); the KV cache
    is then sized by vLLM and actor.kv_cache_gib is unused. None: 0.9 on a GPU of its
    own, an equal share of 0.9 when roles share a GPU (asyncopd/placement.py)."""
    onednn_cache_capacity: int | None = 512
    """On CPU: compiled oneDNN GEMM kernels the engine's process keeps
    (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``), one per layer shape and token count. vLLM's
    CPU layers meet new token counts for a long time, so with oneDNN's default (1024)
    the cache, ~0.5 MB a kernel on the demo model, filled for tens of minutes: RSS rose
    by several hundred MB (bench/results/soak.txt). A miss compiles a kernel (~1.5 ms).
    None: oneDNN's default; 0: no cache (a compilation per GEMM)."""
    cpu_gemm: Literal["packed", "plain"] = "plain"
    """On CPU: how the engine's linear layers multiply. ``plain``: torch's own ``linear``
    on the weights as loaded, nothing to rebuild when weights change, so new weights are
    copied into the live parameters (asyncopd/actor/weight_loading.py; the demo actor's
    load 0.0102 -> 0.0022 core-s per update against vLLM's layerwise reload,
    bench/results/actor_cpu.txt). ``packed``: vLLM's
    default, each weight reordered into a oneDNN kernel handle at load and again at every
    weight update (~0.4-2.5 ms a layer, the handle's kernels compiled anew). Measured
    (bench/results/vs_trl.txt, soak.txt): on the demo plain cut the actor's CPU per
    128-sample step 0.176 -> 0.116 core-s and the job's step 0.186 -> 0.141 s (idle), and
    the actor's RSS stopped growing (10-min soak +12 +- 15 MB/h, ~150 MB lower; packed:
    +96 +- 7, oneDNN's kernel churn); on SmolLM2-135M packed generates ~13% faster
    (actor 14.1 vs 15.3 core-s per 16 x 96-token step, reload 1.13 vs 0.50 s), which is
    the case for packed when the actor is a job's bottleneck on a larger model. With
    plain, torch picks its kernel by batch size, so a seeded request's log-probs depend on
    the batch it shared in the last bit (~1e-6; tokens the same in every measurement);
    packed is bit-identical whatever the batch. Process-wide in vLLM: set when an engine
    is built. Ignored on GPU."""
    malloc_mmap_threshold: int | None = 131072
    """Bytes from which the engine process's glibc malloc serves a block by mmap (returned
    to the OS on free), pinned: glibc's default raises the threshold as large blocks are
    freed, after which their holes stay in the heap arena; with it the actor's RSS kept
    rising ~80 MB/h in a 30-min soak (bench/results/soak.txt). None: glibc's own
    adaptive threshold. Ignored where the C library is not glibc."""

    def __post_init__(self) -> None:
        _check_positive("actor", self, "onednn_cache_capacity", allow_zero=True)
        _check_positive("actor", self, "malloc_mmap_threshold")
        _check_positive("actor", self, "samples_per_prompt", "max_new_tokens", "max_num_seqs")
        _check_fraction("actor.gpu_memory_utilization", self.gpu_memory_utilization)
        _check_positive("actor", self, "max_model_len", "kv_cache_gib", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            _fail("actor.top_p", self.top_p, "must be in (0, 1]", "use 1.0 to disable nucleus sampling")
        if self.max_new_tokens >= self.max_model_len:
            _fail(
                "actor.max_new_tokens", self.max_new_tokens,
                f"leaves no room for a prompt within actor.max_model_len={self.max_model_len}",
                "raise actor.max_model_len or lower actor.max_new_tokens",
            )
