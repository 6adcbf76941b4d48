"""Versioned, bucketed weight broadcast from learner rank 0 to every actor.

The weight group is a stateless gloo process group (group rank 0 = learner rank
0, group rank 1+i = actor i) built on torchrun's store: actors must not hold a
default torch.distributed group because their in-process vLLM engine creates its
own. Every collective has the group's timeout, so a sync that cannot complete
raises (and the job ends with the traceback) instead of hanging.

One update: the learner sends a :class:`~asyncopd.types.WeightUpdate` on the
control channel (what follows: policy_version and the bucket layout), then
streams full tensors one at a time into flat buckets of ``bucket_bytes`` and
broadcasts each bucket as it fills, so the learner never holds a second copy of
the model. Actors join when they choose (between engine steps), receive the
buckets and hand ``(name, tensor)`` pairs to their engine.

Gloo on CPU, the same code with NCCL on GPU is a backend switch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from asyncopd.types import TensorSpec, WeightUpdate

__all__ = ["WeightGroup", "plan_buckets", "broadcast_weights", "receive_weights"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightGroup:
    """The stateless gloo group joining learner rank 0 and the actors."""

    def __init__(self, store: dist.Store, group_rank: int, group_size: int, timeout_s: float) -> None:
        self.group_rank = group_rank
        self.group_size = group_size
        prefixed = dist.PrefixStore("asyncopd/weight_group", store)
        self._pg = dist.ProcessGroupGloo(prefixed, group_rank, group_size, timedelta(seconds=timeout_s))

    def broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._pg.broadcast([tensor], options).wait()


def plan_buckets(specs: Iterable[TensorSpec], bucket_bytes: int) -> list[list[TensorSpec]]:
    """Pack tensors, in order, into buckets of one dtype and at most ``bucket_bytes``
    (a tensor larger than that gets a bucket of its own)."""
    buckets: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        nbytes = _numel(spec) * torch.empty(0, dtype=_DTYPES[spec.dtype]).element_size()
        current = buckets[-1] if buckets else None
        if current is None or current[0].dtype != spec.dtype or size + nbytes > bucket_bytes:
            buckets.append([spec])
            size = nbytes
        else:
            current.append(spec)
            size += nbytes
    return buckets


def _numel(spec: TensorSpec) -> int:
    n = 1
    for dim in spec.shape:
        n *= dim
    return n


def broadcast_weights(group: WeightGroup, update: WeightUpdate,
                      tensors: Iterator[tuple[str, torch.Tensor]]) -> float:
    """Learner side: stream ``tensors`` (in the order of ``update.buckets``) to the
    actors. Returns seconds spent. Raises if the stream does not match the plan."""
    start = time.perf_counter()
    for bucket in update.buckets:
        flat = torch.empty(sum(_numel(s) for s in bucket), dtype=_DTYPES[bucket[0].dtype])
        offset = 0
        for spec in bucket:
            name, tensor = next(tensors)
            if name != spec.name or tuple(tensor.shape) != tuple(spec.shape):
                raise RuntimeError(
                    f"weight stream out of plan: got {name} {tuple(tensor.shape)}, expected "
                    f"{spec.name} {tuple(spec.shape)}"
                )
            n = _numel(spec)
            flat[offset:offset + n].copy_(tensor.reshape(-1))
            offset += n
        group.broadcast(flat)
    return time.perf_counter() - start


def receive_weights(group: WeightGroup, update: WeightUpdate) -> Iterator[tuple[str, torch.Tensor]]:
    """Actor side: receive every bucket of ``update``; yields (name, tensor) views."""
    for bucket in update.buckets:
        if bucket[0].dtype not in _DTYPES or any(s.dtype != bucket[0].dtype for s in bucket):
            raise ValueError(f"bucket with unsupported or mixed dtypes: {[s.dtype for s in bucket]}")
        flat = torch.empty(sum(_numel(s) for s in bucket), dtype=_DTYPES[bucket[0].dtype])
        group.broadcast(flat)
        offset = 0
        for spec in bucket:
            n = _numel(spec)
            yield spec.name, flat[offset:offset + n].view(spec.shape)
            offset += n
