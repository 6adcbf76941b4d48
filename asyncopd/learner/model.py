"""The student model on the learner ranks: loading, FSDP2 sharding, per-token
log-probs, and streaming its full weights.

Who calls it: the learner role (and tests). Every function that touches a
sharded model issues collectives, so all learner ranks must call it together and
in the same order; the FSDP mesh spans the learner process group only.

Assumptions about the model: a Hugging Face causal LM whose logits are
``get_output_embeddings()(base_model(...).last_hidden_state)`` and whose decoder
blocks are ``base_model.layers`` (Llama, Qwen2/3, Mistral families). Models with
logit soft-capping or scaling are not supported by :func:`token_logprobs`.

This module does not build optimisers, compute losses or write checkpoints.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from transformers import AutoModelForCausalLM, PreTrainedModel

__all__ = [
    "load_student",
    "make_mesh",
    "shard_model",
    "TokenStats",
    "ChunkFn",
    "token_stats",
    "token_logprobs",
    "iter_full_weights",
    "model_device",
]

logger = logging.getLogger(__name__)

# Name of the FSDP forward method attached by shard_model (runs FSDP's root hooks).
_STATS_METHOD = "_asyncopd_token_stats"
# A chunk's [n, vocab] logits are recomputed in backward (activation checkpointing)
# only above this many elements (16 MiB in float32): below it, keeping them costs less
# memory than a real model's single chunk and saves the recompute (small vocabularies).
_CHECKPOINT_MIN_LOGITS = 1 << 22


def load_student(path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load the student from a Hugging Face directory on CPU, in training mode,
    without KV cache. ``dtype`` is the master-weight dtype (keep float32 and use
    the FSDP ``param_dtype`` for bf16 compute)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"student model {str(path)!r} has no config.json; set model.student.path "
                                "to a Hugging Face model directory")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.config.use_cache = False
    model.train()
    return model


def make_mesh(device_type: str = "cpu", group: dist.ProcessGroup | None = None) -> DeviceMesh:
    """A 1-d data-parallel mesh ("dp") over ``group``, by default the default
    process group (the learner ranks, when the learner initialised it alone)."""
    if not dist.is_initialized():
        raise RuntimeError("make_mesh needs torch.distributed; call init_process_group first "
                           "(a 1-rank group is fine)")
    if group is None:
        return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    return DeviceMesh.from_group(group, device_type, mesh_dim_names=("dp",))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "base_model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no base_model.layers ModuleList; shard_model "
                        "supports decoder-only HF models (Llama/Qwen/Mistral style)")
    return layers


def shard_model(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.float32,
                *, reshard_after_forward: bool = True) -> nn.Module:
    """Apply FSDP2 in place: ``fully_shard`` each decoder layer, then the root.

    Compute runs in ``param_dtype``, gradients are reduced in float32, master
    weights keep their load dtype. The root keeps its parameters (embeddings,
    final norm, head) unsharded between forward and backward (FSDP's default).
    Also registers :func:`token_stats`' computation as an FSDP forward method,
    so it runs under the root's all-gather / reduce-scatter hooks. Gradients are
    *averaged* over ranks (FSDP default): see ``train_step`` for the scaling.
    Works with a 1-rank mesh. Returns ``model`` (now also an ``FSDPModule``).
    """
    mp_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy)
    setattr(model, _STATS_METHOD, functools.partial(_token_stats_impl, model))
    register_fsdp_forward_method(model, _STATS_METHOD)
    logger.info("sharded %s over %d ranks (param_dtype=%s)", type(model).__name__, mesh.size(), param_dtype)
    return model


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's (local) parameters: where inputs must go."""
    return next(model.parameters()).device


@dataclass(frozen=True, slots=True)
class TokenStats:
    """Per-position statistics of the student's next-token distribution, all
    aligned like :func:`token_logprobs` (position ``t`` describes token ``t + 1``)."""

    logprobs: Tensor
    """float32 [B, T]: log p(input_ids[b, t+1]); 0 at the last position."""
    entropy: Tensor | None = None
    """float32 [B, T]: entropy of the whole next-token distribution (with grad)."""
    topk_logprobs: Tensor | None = None
    """float32 [B, T, K]: log p of each id in ``topk_ids``; -inf where the id is -1."""
    extra: Tensor | None = None
    """float32 [B, T, E]: what ``chunk_fn`` returned for each position (0 at the last)."""


ChunkFn = Callable[[Tensor, int, int], Tensor]
"""An extra per-position statistic computed from each chunk's logits:
``(logits [n, V] float32 of flat positions [start, stop), start, stop) -> [n, E]``.
Flat position ``i`` is ``(b, t) = divmod(i, seq - 1)``. Under autograd it runs
again in backward (the chunk is recomputed), so it must be deterministic."""


def _chunk_stats(head: nn.Module, hidden: Tensor, targets: Tensor, topk_ids: Tensor, temperature: float,
                 want_entropy: bool, chunk_fn: ChunkFn | None = None,
                 start: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One chunk: hidden [N, H], targets [N], topk_ids [N, K] (K may be 0, -1 = none)
    -> (log p(target) [N], entropy [N] or [0], log p(topk ids) [N, K],
    chunk_fn's [N, E] or [N, 0]), float32."""
    logits = head(hidden).float()  # [N, V]
    if temperature != 1.0:
        logits = logits / temperature
    extra = (logits.new_zeros(logits.shape[0], 0) if chunk_fn is None
             else chunk_fn(logits, start, start + logits.shape[0]))
    log_z = torch.logsumexp(logits, dim=-1)  # [N]
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z  # [N]
    entropy = (log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)) if want_entropy else logits.new_zeros(0)
    valid = topk_ids >= 0  # [N, K]
    topk = logits.gather(-1, topk_ids.clamp(min=0)) - log_z.unsqueeze(-1)  # [N, K]
    topk = torch.where(valid, topk, torch.full_like(topk, -math.inf))
    return picked, entropy, topk, extra


def _token_stats_impl(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, topk_ids: Tensor | None,
                      chunk_tokens: int, temperature: float, want_entropy: bool,
                      chunk_fn: ChunkFn | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, seq = input_ids.shape
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=False).last_hidden_state  # [B, T, H]
    head = model.get_output_embeddings()
    num = batch * (seq - 1)
    flat_hidden = hidden[:, :-1].reshape(num, hidden.shape[-1])  # [N, H]
    flat_targets = input_ids[:, 1:].reshape(-1)  # [N]
    k = 0 if topk_ids is None else topk_ids.shape[-1]
    flat_topk = (input_ids.new_zeros(num, 0) if topk_ids is None
                 else topk_ids[:, :-1].reshape(num, k).to(input_ids.device))  # [N, K]
    vocab = head.weight.shape[0]
    pieces = []
    for start in range(0, num, chunk_tokens):
        args = (head, flat_hidden[start:start + chunk_tokens], flat_targets[start:start + chunk_tokens],
                flat_topk[start:start + chunk_tokens], temperature, want_entropy, chunk_fn, start)
        if torch.is_grad_enabled() and min(chunk_tokens, num - start) * vocab > _CHECKPOINT_MIN_LOGITS:
            # Recompute the chunk's [n, V] logits in backward instead of keeping them all.
            pieces.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_stats(*args))

    def assemble(parts: list[Tensor], *trailing: int) -> Tensor:
        # The last position predicts nothing: pad it with 0 to keep the [B, T] layout.
        body = torch.cat(parts).reshape(batch, seq - 1, *trailing)
        return torch.cat([body, body.new_zeros(batch, 1, *trailing)], dim=1)

    logprobs = assemble([p[0] for p in pieces])  # [B, T]
    entropy = assemble([p[1] for p in pieces]) if want_entropy else logprobs.new_zeros(0)
    topk = assemble([p[2] for p in pieces], k)  # [B, T, K]
    extra = assemble([p[3] for p in pieces], pieces[0][3].shape[-1])  # [B, T, E]
    return logprobs, entropy, topk, extra


def token_stats(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *, topk_ids: Tensor | None = None,
                entropy: bool = False, chunk_tokens: int = 1024, temperature: float = 1.0,
                chunk_fn: ChunkFn | None = None) -> TokenStats:
    """The student's next-token log-probs and, on request, entropies and the
    log-probs of given candidate ids, in one chunked pass over the vocabulary.

    input_ids, attention_mask: [B, T] (right-padded). ``topk_ids``: int [B, T, K],
    aligned like the output (ids of candidates for token ``t + 1``), -1 for none.
    The vocabulary projection and log-softmax run over chunks of ``chunk_tokens``
    positions (recomputed in backward under autograd when a chunk holds more than
    ``_CHECKPOINT_MIN_LOGITS`` logits), so the full ``[B*T, V]`` logits of a large
    vocabulary never exist at once. ``temperature`` divides the logits (match the
    actors' sampling temperature for importance ratios). ``chunk_fn`` adds a
    statistic of each chunk's logits (:data:`ChunkFn`; e.g. the full-vocabulary
    reverse KL to an in-process teacher) as ``TokenStats.extra``. Works on plain and
    :func:`shard_model`-ed models; on a sharded model every rank must call it the
    same number of times.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, seq] with seq >= 2, got {tuple(input_ids.shape)}")
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens={chunk_tokens}: must be positive")
    if topk_ids is not None and topk_ids.shape[:2] != input_ids.shape:
        raise ValueError(f"topk_ids must be [batch, seq, k] matching input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(topk_ids.shape)}")
    fsdp_method = getattr(model, _STATS_METHOD, None)
    args = (input_ids, attention_mask, topk_ids, chunk_tokens, temperature, entropy, chunk_fn)
    if fsdp_method is None:
        logprobs, ent, topk, extra = _token_stats_impl(model, *args)
    else:
        logprobs, ent, topk, extra = fsdp_method(*args)
        if not torch.is_grad_enabled() and isinstance(model, FSDPModule):
            # No backward will reshard the root: do it now, or a later optimizer step
            # would leave the root's unsharded copy stale.
            model.reshard()
    return TokenStats(logprobs=logprobs, entropy=ent if entropy else None,
                      topk_logprobs=topk if topk_ids is not None else None,
                      extra=extra if chunk_fn is not None else None)


def token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, *,
                   chunk_tokens: int = 1024, temperature: float = 1.0) -> Tensor:
    """Log-prob of each next token: ``out[b, t] = log p(input_ids[b, t+1] | ids[b, :t+1])``,
    float32 [B, T] with ``out[:, -1] = 0`` (see :func:`token_stats`)."""
    return token_stats(model, input_ids, attention_mask, chunk_tokens=chunk_tokens,
                       temperature=temperature).logprobs


@torch.no_grad()
def iter_full_weights(model: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """Stream ``(hf_name, full_tensor)`` for every entry of the HF state dict.

    On a sharded model each tensor is all-gathered with ``DTensor.full_tensor()``
    (cast to ``dtype`` first, which also halves the traffic for bf16): a
    collective, so every learner rank must iterate to the end, in step. Names are
    those of the unwrapped HF model's ``state_dict()``; a tied output embedding is
    yielded under both names (``lm_head.weight`` too, which vLLM loads), gathered
    once. Each yielded tensor is a fresh full copy on every rank; keep it only
    where needed.
    """
    if isinstance(model, FSDPModule):
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()  # state_dict must see the sharded DTensors
    entries = list(model.state_dict(keep_vars=True).items())
    names_of: dict[int, list[str]] = {}
    for name, tensor in entries:
        names_of.setdefault(id(tensor), []).append(name)
    emitted: set[int] = set()
    for _, tensor in entries:
        if id(tensor) in emitted:
            continue
        emitted.add(id(tensor))
        local = tensor.detach()
        if dtype is not None:
            local = local.to(dtype)
        full = local.full_tensor() if isinstance(local, DTensor) else local.clone()
        for name in names_of[id(tensor)]:
            yield name, full
