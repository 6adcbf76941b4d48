"""The learner on its device: process group, mesh, precision and model building.

Who calls it: the learner role (:mod:`asyncopd.learner.worker`) and tests. The
device comes from the launcher's placement (:mod:`asyncopd.placement`): "cpu", or
"cuda:0" (the process sees only its own GPU). On CUDA the learner group has two
backends, ``cpu:gloo,cuda:nccl``: FSDP2's collectives on GPU tensors go over NCCL,
the small CPU-side ones (the shared batch, micro-batch counts, metric sums) stay
on gloo. On CPU it is gloo alone, as before.

:func:`build_student` makes the sharded student without a full fp32 copy on every
rank: the model is built on the meta device and sharded, rank 0 alone loads the
checkpoint (on the host), and ``set_model_state_dict(broadcast_from_rank0=True)``
sends every rank its shards; buffers that are not in the state dict (rotary
``inv_freq``) are broadcast from rank 0 too (``to_empty`` leaves them garbage:
shared/notes/fsdp-cpu.md). With one learner rank the model is simply loaded, and
left unsharded when it also computes in its master dtype (:func:`needs_fsdp`):
FSDP2 on a 1-rank mesh then only adds copies and hooks (all-gather into itself,
a reduce-scatter over gloo per layer and pass), 15-20% of the demo's train step.

This module does not build optimisers or compute losses.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from asyncopd.learner.model import load_student, make_mesh, shard_model
from asyncopd.placement import limit_gpu_memory

__all__ = ["init_learner_group", "resolve_param_dtype", "build_student", "limit_memory", "needs_fsdp"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_param_dtype(name: str, device: torch.device) -> torch.dtype:
    """learner.param_dtype with "auto" decided: bfloat16 on GPU, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def init_learner_group(device: torch.device, store: dist.Store, rank: int, world_size: int) -> None:
    """The learners' default process group: gloo on CPU, ``cpu:gloo,cuda:nccl`` on GPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)


def limit_memory(device: torch.device, fraction: float | None) -> None:
    """Cap this process's CUDA caching allocator (a GPU shared with engines)."""
    limit_gpu_memory(str(device), fraction, role="learner")


def needs_fsdp(world_size: int, param_dtype: torch.dtype, master_dtype: torch.dtype = torch.float32) -> bool:
    """Whether the student is wrapped in FSDP2: always on several ranks; on one rank
    only for mixed precision (FSDP's ``MixedPrecisionPolicy`` casts for compute).
    A 1-rank float32 student is a plain module: nothing to shard, gather or reduce,
    and every consumer (train step, weight stream, checkpoint) takes both kinds."""
    return world_size > 1 or param_dtype != master_dtype


def build_student(path: str | Path, device: torch.device, param_dtype: torch.dtype, *,
                  activation_checkpointing: bool = False) -> nn.Module:
    """The student, FSDP2-sharded over the default group, on ``device``: fp32 master
    weights, compute in ``param_dtype``, float32 gradient reduction; on one rank
    without mixed precision, the plain model (:func:`needs_fsdp`). Every learner rank
    calls it together."""
    world = dist.get_world_size()
    if world == 1:
        model = load_student(path, torch.float32)
        _configure(model, activation_checkpointing)
        model.to(device)
        if not needs_fsdp(world, param_dtype):
            logger.info("one learner rank in float32: %s left unsharded (no FSDP2)", type(model).__name__)
            return model
        return shard_model(model, make_mesh(device.type), param_dtype)
    mesh = make_mesh(device.type)
    full = load_student(path, torch.float32) if dist.get_rank() == 0 else None
    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    _configure(model, activation_checkpointing)
    shard_model(model, mesh, param_dtype)
    model.to_empty(device=device)
    _load_from_rank0(model, full, device)
    del full
    return model


def _configure(model: nn.Module, activation_checkpointing: bool) -> None:
    if activation_checkpointing:
        # HF's per-layer checkpointing (non-reentrant): the decoder layers recompute their
        # activations in backward; module names (and so weight and checkpoint names) are unchanged.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@torch.no_grad()
def _load_from_rank0(model: nn.Module, full: nn.Module | None, device: torch.device) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    # Buffers outside the state dict (persistent=False, e.g. rotary inv_freq): rank 0's values.
    persistent = set(model.state_dict())
    source = dict(full.named_buffers()) if full is not None else {}
    for name, buffer in model.named_buffers():
        if name in persistent:
            continue
        if full is not None:
            buffer.copy_(source[name].to(device))
        dist.broadcast(buffer, src=0)
