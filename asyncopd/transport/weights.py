"""Versioned, bucketed weight broadcast from learner rank 0 to every actor.

The weight group is a stateless process group (group rank 0 = learner rank 0,
group rank 1 + i * tp + j = worker j of actor i's tensor-parallel engine) built on
torchrun's store: actors must not hold a default torch.distributed group because
their vLLM engine creates its own. The receiving end lives inside the vLLM worker
(:mod:`asyncopd.actor.weight_receiver`), which joins the group through a store
client of its own (:func:`connect_store`). Every collective has the group's
timeout, so a sync that cannot complete raises (and the job ends with the
traceback) instead of hanging.

One protocol, three carriers (``Placement.weight_carrier``):

- ``gloo``: CPU tensors, a ``ProcessGroupGloo`` (CPU jobs);
- ``nccl``: CUDA tensors GPU to GPU, a ``ProcessGroupNCCL`` (learner rank 0 and the
  actors on different GPUs);
- ``cuda_ipc``: learner and actors on one GPU (NCCL refuses two ranks on one
  device): each bucket is filled on the learner's GPU, its CUDA IPC handle is put
  in the store, and every actor copies it into its own buffer and acknowledges
  (store counter) before the learner reuses the memory. Handles travel as msgpack,
  never pickle.

One update: the learner sends a :class:`~asyncopd.types.WeightUpdate` on the
control channel (what follows: policy_version and the bucket layout), then
streams full tensors one at a time into flat buckets of ``bucket_bytes`` and
broadcasts each bucket as it fills, so the learner never holds a second copy of
the model. Actors join when they choose (between engine steps), receive the
buckets and hand ``(name, tensor)`` pairs to their engine.

Nothing here decides placement; the carrier and device are given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from datetime import timedelta

import msgspec
import torch
import torch.distributed as dist

from asyncopd.types import TensorSpec, WeightUpdate

__all__ = ["WeightGroup", "connect_store", "store_address", "plan_buckets", "broadcast_weights", "receive_weights", "CARRIERS"]

CARRIERS = ("gloo", "nccl", "cuda_ipc")

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class WeightGroup:
    """The stateless group joining learner rank 0 and the actors' engine workers."""

    def __init__(self, store: dist.Store, group_rank: int, group_size: int, timeout_s: float, *,
                 carrier: str = "gloo", device: torch.device | str = "cpu",
                 prefix: str = "asyncopd/weight_group") -> None:
        if carrier not in CARRIERS:
            raise ValueError(f"carrier={carrier!r}: one of {CARRIERS}")
        self.group_rank = group_rank
        self.group_size = group_size
        self.carrier = carrier
        self.device = torch.device(device)
        if carrier != "gloo" and self.device.type != "cuda":
            raise ValueError(f"carrier={carrier!r} moves CUDA tensors, but this member's device is {self.device}. "
                             "Fix: the placement gives gloo to CPU jobs; run every role on GPU or none.")
        prefixed = dist.PrefixStore(prefix, store)
        timeout = timedelta(seconds=timeout_s)
        self._ipc: _IpcBroadcast | None = None
        if carrier == "gloo":
            self._pg = dist.ProcessGroupGloo(prefixed, group_rank, group_size, timeout)
        elif carrier == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._pg = dist.ProcessGroupNCCL(prefixed, group_rank, group_size, options)
        else:
            self._ipc = _IpcBroadcast(prefixed, group_rank, group_size, timeout_s)

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Group rank 0's ``tensor`` into everyone's ``tensor`` (same shape and dtype)."""
        if self._ipc is not None:
            self._ipc.broadcast(tensor)
            return
        options = dist.BroadcastOptions()
        options.rootRank = 0
        self._pg.broadcast([tensor], options).wait()
        if tensor.is_cuda:
            # NCCL's wait() only orders the current stream; the consumer may read on the host side.
            torch.cuda.current_stream(tensor.device).synchronize()


def store_address(store: dist.Store) -> tuple[str, int]:
    """(host, port) of the TCP store under ``store``'s prefixes (torchrun's), which a
    vLLM worker process connects to with :func:`connect_store`."""
    raw = store._underlying_non_prefix_store if isinstance(store, dist.PrefixStore) else store
    if not isinstance(raw, dist.TCPStore):
        raise TypeError(f"the weight group needs torchrun's TCP store, got {type(raw).__name__}")
    return raw.host, raw.port


def connect_store(host: str, port: int, timeout_s: float) -> dist.Store:
    """A client of torchrun's store, for a process that did not get it from torchrun
    (a vLLM worker process of a tensor-parallel actor)."""
    return dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                         use_libuv=True)


class _IpcHandle(msgspec.Struct, array_like=True, frozen=True):
    """What a receiver needs to map a CUDA allocation of the learner (torch's
    ``reduce_tensor`` arguments, without the Python types)."""

    numel: int
    dtype: str
    device: int
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool


class _IpcBroadcast:
    """Broadcast over CUDA IPC on one GPU: handle in the store, copy, acknowledge."""

    def __init__(self, store: dist.Store, rank: int, size: int, timeout_s: float) -> None:
        self.store, self.rank, self.size, self.timeout_s = store, rank, size, timeout_s
        self.seq = 0

    def broadcast(self, tensor: torch.Tensor) -> None:
        key = f"ipc/{self.seq}"
        self.seq += 1
        if self.rank == 0:
            self._send(key, tensor)
        else:
            self._receive(key, tensor)

    def _send(self, key: str, tensor: torch.Tensor) -> None:
        from torch.multiprocessing.reductions import reduce_tensor

        torch.cuda.current_stream(tensor.device).synchronize()  # the bucket is filled before others read it
        _, args = reduce_tensor(tensor.contiguous())
        (_, size, _, offset, _, dtype, device, handle, storage_bytes, storage_offset, _,
         ref_handle, ref_offset, event, event_sync) = args
        if offset != 0:
            raise RuntimeError("weight bucket is a view with an offset; allocate a fresh buffer per bucket")
        record = _IpcHandle(int(torch.Size(size).numel()), str(dtype).removeprefix("torch."), int(device),
                            bytes(handle), int(storage_bytes), int(storage_offset), bytes(ref_handle),
                            int(ref_offset), None if event is None else bytes(event), bool(event_sync))
        self.store.set(key, msgspec.msgpack.encode(record))
        deadline = time.monotonic() + self.timeout_s
        while int(self.store.add(f"{key}/acks", 0)) < self.size - 1:
            if time.monotonic() > deadline:
                raise TimeoutError(f"weight bucket {key}: {self.size - 1} actors did not acknowledge the CUDA IPC "
                                   f"copy within learner.weight_sync_timeout_s={self.timeout_s}")
            time.sleep(0.0005)
        self.store.delete_key(key)

    def _receive(self, key: str, tensor: torch.Tensor) -> None:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        self.store.wait([key], timedelta(seconds=self.timeout_s))
        record = msgspec.msgpack.decode(self.store.get(key), type=_IpcHandle)
        if record.numel != tensor.numel() or record.dtype != str(tensor.dtype).removeprefix("torch."):
            raise RuntimeError(f"weight bucket {key}: the learner shared {record.numel} x {record.dtype}, "
                               f"this actor expected {tensor.numel()} x {tensor.dtype}")
        shared = rebuild_cuda_tensor(torch.Tensor, (record.numel,), (1,), 0, torch.UntypedStorage,
                                     _DTYPES[record.dtype], record.device, record.storage_handle,
                                     record.storage_size_bytes, record.storage_offset_bytes, False,
                                     record.ref_counter_handle, record.ref_counter_offset, record.event_handle,
                                     record.event_sync_required)
        tensor.copy_(shared.view(tensor.shape))
        torch.cuda.current_stream(tensor.device).synchronize()
        del shared
        self.store.add(f"{key}/acks", 1)


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
        flat = torch.empty(sum(_numel(s) for s in bucket), dtype=_DTYPES[bucket[0].dtype], device=group.device)
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
    """Actor side: receive every bucket of ``update`` (on the group's device) as it
    is consumed; yields (name, tensor) views. Only the bucket being read is held
    here: the caller keeps what it must, never a list of the whole model."""
    for bucket in update.buckets:
        if bucket[0].dtype not in _DTYPES or any(s.dtype != bucket[0].dtype for s in bucket):
            raise ValueError(f"bucket with unsupported or mixed dtypes: {[s.dtype for s in bucket]}")
        flat = torch.empty(sum(_numel(s) for s in bucket), dtype=_DTYPES[bucket[0].dtype], device=group.device)
        group.broadcast(flat)
        offset = 0
        for spec in bucket:
            n = _numel(spec)
            yield spec.name, flat[offset:offset + n].view(spec.shape)
            offset += n
