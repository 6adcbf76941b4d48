"""The receiving end of the weight protocol, inside the actor's vLLM worker.

vLLM mixes :class:`WeightReceiverExtension` into its worker class
(``worker_extension_cls``), so its methods run where the model lives, reached by
``collective_rpc`` (a plain call when the engine is in-process, an RPC to each
tensor-parallel worker otherwise). This is the PipelineRL / prime-rl pattern: the
trainer streams tensors straight into the worker, nothing passes through the
actor's Python frontend or its host memory.

Per engine, then per update::

    asyncopd_choose_weight_loader(cpu_gemm)  once: copy in place or reload (actor.weight_loading)
    asyncopd_join_weight_group(...)          once: a store client and the weight group member
    asyncopd_receive_weights(update)         check the plan, then load over a stream that
                                             receives bucket after bucket (weights.receive_weights)
    asyncopd_load_weights(items)             tensors handed over in-process (VllmEngine.load_weights)

The plan (names, shapes, dtypes of every bucket) is checked against the model's
Hugging Face parameters *before* anything is received or loaded: a reload that
fails half-way leaves layers on the meta device and kills the engine. Only one
bucket is held at a time (plus what vLLM's layerwise reload keeps of an incomplete
layer; an in-place load copies each tensor as it arrives). A tied ``lm_head`` is not sent; on vLLM's CPU build, which packs the logits
kernel separately from the embedding, the receiver adds it from the embedding
(shared/notes/vllm-cpu.md); on GPU vLLM ties it itself.

The same code runs on CPU (gloo) and GPU (NCCL, CUDA IPC): the carrier is the only
difference, and it is the weight group's business (:mod:`asyncopd.transport.weights`).
This module never imports another role and owns no sockets.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from asyncopd.actor.weight_loading import LoaderChoice, choose_weight_loader, load_in_place
from asyncopd.transport import codec
from asyncopd.transport.weights import WeightGroup, connect_store, receive_weights
from asyncopd.types import WeightUpdate

__all__ = ["WeightReceiverExtension", "EXTENSION_QUALNAME", "check_plan", "expected_shapes"]

logger = logging.getLogger(__name__)

EXTENSION_QUALNAME = "asyncopd.actor.weight_receiver.WeightReceiverExtension"

_MAX_LISTED_PROBLEMS = 8


def expected_shapes(hf_config) -> tuple[dict[str, tuple[int, ...]], bool]:
    """HF parameter shapes by name (from the config, on the meta device) and whether
    the output embedding is tied to the input one (then ``lm_head.weight`` is absent)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    tied = bool(getattr(hf_config.get_text_config(), "tie_word_embeddings", False))
    return shapes, tied


def check_plan(update: WeightUpdate, shapes: dict[str, tuple[int, ...]], tied: bool) -> list[str]:
    """Problems with a plan (empty: loadable). Every parameter exactly once, known
    names, matching shapes, floating dtypes; ``lm_head.weight`` optional when tied."""
    problems: list[str] = []
    seen: set[str] = set()
    for bucket in update.buckets:
        for spec in bucket:
            name = spec.name
            if name == "lm_head.weight" and tied and "lm_head.weight" not in shapes:
                expected = shapes.get("model.embed_tokens.weight")
            else:
                expected = shapes.get(name)
            if expected is None:
                problems.append(f"unknown parameter name {name!r}")
            elif name in seen:
                problems.append(f"{name!r} appears twice")
            elif spec.dtype not in ("float32", "bfloat16", "float16"):
                problems.append(f"{name!r} has dtype {spec.dtype}, not a floating-point dtype")
            elif tuple(spec.shape) != expected:
                problems.append(f"{name!r} has shape {tuple(spec.shape)}, expected {expected}")
            seen.add(name)
    missing = sorted(set(shapes) - seen)
    if missing and not problems:
        problems.append(f"{len(missing)} parameters missing, e.g. {missing[:3]} "
                        "(an update must hold every parameter of the model)")
    return problems


class WeightReceiverExtension:
    """Mixed into vLLM's worker: joins the weight group, receives updates in place.

    Attribute names carry the ``asyncopd_`` prefix: vLLM refuses an extension that
    shadows a worker attribute.
    """

    def asyncopd_choose_weight_loader(self, cpu_gemm: str) -> tuple[str, str]:
        """Choose how this worker's model takes new weights (actor.weight_loading), for an
        engine built with ``actor.cpu_gemm=cpu_gemm``; returns (loader, reason). Until it is
        called, weights go through vLLM's layerwise reload."""
        self.asyncopd_loader = choose_weight_loader(self.model_runner.get_model(), cpu_gemm)
        return self.asyncopd_loader.loader, self.asyncopd_loader.reason

    def asyncopd_load_weights(self, items: list[tuple[str, torch.Tensor]]) -> None:
        """Load checked ``(HF name, tensor)`` pairs with the chosen loader. The tensors
        pass by reference only with the engine in-process (VllmEngine's setting)."""
        self._asyncopd_load(iter(items))

    def asyncopd_join_weight_group(self, store_host: str, store_port: int, prefix: str, first_group_rank: int,
                                   group_size: int, timeout_s: float, carrier: str) -> int:
        """Join the weight group as member ``first_group_rank + <this worker's TP rank>``.
        Blocks until every member (learner rank 0 included) has joined. Returns the
        member's group rank."""
        from vllm.platforms import current_platform

        rank = first_group_rank + int(getattr(self, "rank", 0))
        device = torch.device("cpu") if current_platform.is_cpu() else torch.device(
            f"cuda:{torch.cuda.current_device()}")
        store = connect_store(store_host, store_port, timeout_s)
        self.asyncopd_weight_group = WeightGroup(store, rank, group_size, timeout_s, carrier=carrier, device=device,
                                                 prefix=prefix)
        self.asyncopd_add_tied_head = current_platform.is_cpu()
        shapes, tied = expected_shapes(self.model_config.hf_config)
        self.asyncopd_shapes, self.asyncopd_tied = shapes, tied
        logger.info("joined the weight group as member %d of %d (%s on %s)", rank, group_size, carrier, device)
        return rank

    def asyncopd_check_update(self, update_bytes: bytes) -> list[str]:
        """The plan's problems (empty: loadable); nothing is received."""
        update = _decode(update_bytes)
        return check_plan(update, self.asyncopd_shapes, self.asyncopd_tied)

    def asyncopd_receive_weights(self, update_bytes: bytes) -> float:
        """Receive ``update`` (a msgpack-encoded WeightUpdate) bucket by bucket into the
        model with the chosen loader; returns seconds. Call only after
        :meth:`asyncopd_check_update` found no problem."""
        start = time.perf_counter()
        update = _decode(update_bytes)
        self._asyncopd_load(self._asyncopd_stream(update))
        if self.asyncopd_weight_group.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def _asyncopd_load(self, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
        choice: LoaderChoice | None = getattr(self, "asyncopd_loader", None)
        if choice is not None and choice.loader == "in_place":
            load_in_place(self.model_runner.get_model(), choice, weights)
        else:
            self.reload_weights(weights_iterator=weights)

    def _asyncopd_stream(self, update: WeightUpdate) -> Iterator[tuple[str, torch.Tensor]]:
        sent_head = False
        embed: torch.Tensor | None = None
        for name, tensor in receive_weights(self.asyncopd_weight_group, update):
            sent_head |= name == "lm_head.weight"
            if name == "model.embed_tokens.weight":
                embed = tensor
            yield name, tensor
        if self.asyncopd_tied and self.asyncopd_add_tied_head and not sent_head and embed is not None:
            # vLLM's CPU build packs the logits kernel apart from the embedding it is tied to.
            yield "lm_head.weight", embed


def _decode(update_bytes: bytes) -> WeightUpdate:
    update = codec.decode(bytes(update_bytes))
    if not isinstance(update, WeightUpdate):
        raise TypeError(f"expected a WeightUpdate, got {type(update).__name__}")
    return update
