"""How new weights get into the actor's live vLLM model: copied in place, or reloaded.

Two loaders, chosen once per engine by :func:`choose_weight_loader` (the one place
that looks at the platform and at how the model multiplies):

``in_place``
    vLLM's own ``model.load_weights(iterator)``: each tensor is copied into the
    existing parameter by its ``weight_loader`` (stacked qkv / gate_up shards handled
    by the model). Right only when every linear layer computes with torch's ``linear``
    on the parameter it holds: on vLLM's CPU build with ``actor.cpu_gemm=plain``. There
    nothing derived from the weights (a packed kernel, a quantized copy) has to be
    rebuilt, and the layerwise reload's re-materialisation of every layer and its
    rerun of ``process_weights_after_loading`` are pure overhead (the demo actor's
    load: 0.0102 -> 0.0022 core-s per update, bench/results/actor_cpu.txt).
``reload``
    vLLM's layerwise ``reload_weights``: layers restored from recorded metadata, the
    weights loaded, ``process_weights_after_loading`` run again. Needed wherever a
    layer keeps a processed copy of its weight: oneDNN / sgl / zentorch handles on CPU
    (``packed``, or a CPU whose bf16 GEMM vLLM packs regardless), repacked or quantized
    weights on GPU.

A ``plain`` choice is verified on the model, not assumed: if any layer multiplies
with something other than its live weight, the reload is used and the reason logged.

Tied embeddings: in the model vLLM builds, the logits head of a tied model shares the
embedding's Parameter, so an in-place load of ``model.embed_tokens.weight`` is the
head's too; an ``lm_head.weight`` entry for a head that is that same Parameter is
skipped (it would copy the same values twice). Where the head has its own Parameter,
it is loaded like any other.

Called from inside the vLLM worker (:mod:`asyncopd.actor.weight_receiver`); this
module owns no state, no sockets and no configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["LoaderChoice", "WeightLoader", "choose_weight_loader", "load_in_place", "plain_gemm_problem"]

logger = logging.getLogger(__name__)

WeightLoader = Literal["in_place", "reload"]

_TIED_HEAD = "lm_head.weight"
_EMBEDDING = "model.embed_tokens.weight"
# The names vLLM's dispatch_cpu_unquantized_gemm's torch fallback refers to
# (``lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)``).
_TORCH_LINEAR_NAMES = ("torch", "nn", "functional", "linear")


@dataclass(frozen=True, slots=True)
class LoaderChoice:
    """The loader of one engine and why it was chosen."""

    loader: WeightLoader
    reason: str
    """One line for the log: what made this the loader."""
    parameter_names: frozenset[str] = frozenset()
    """in_place: the model's parameter names (vLLM's), each of which a load must reach."""


def plain_gemm_problem(model: torch.nn.Module) -> str | None:
    """None if every vLLM CPU linear layer of ``model`` multiplies with torch's
    ``linear`` on the weight it holds; else the first layer that does not, and why."""
    for name, module in model.named_modules():
        gemm = getattr(module, "cpu_linear", None)
        if gemm is None:
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            return f"layer {name!r} holds no weight (vLLM moved it into a packed kernel)"
        if gemm is torch.nn.functional.linear:
            continue
        code = getattr(gemm, "__code__", None)
        if code is None or tuple(code.co_names) != _TORCH_LINEAR_NAMES:
            return f"layer {name!r} multiplies with {getattr(gemm, '__qualname__', gemm)!r}, not torch's linear"
    return None


def choose_weight_loader(model: torch.nn.Module, cpu_gemm: str) -> LoaderChoice:
    """The loader for ``model`` (vLLM's live model) of an engine built with
    ``actor.cpu_gemm=cpu_gemm``; see the module docstring."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return LoaderChoice("reload", "not vLLM's CPU build: vLLM may repack or quantize weights after loading")
    if cpu_gemm != "plain":
        return LoaderChoice("reload", f"actor.cpu_gemm={cpu_gemm}: oneDNN handles are rebuilt from each new weight")
    problem = plain_gemm_problem(model)
    if problem is not None:
        return LoaderChoice("reload", f"actor.cpu_gemm=plain, but {problem}")
    names = frozenset(name for name, _ in model.named_parameters())
    return LoaderChoice("in_place", "actor.cpu_gemm=plain: every linear layer multiplies with its live weight",
                        parameter_names=names)


def load_in_place(model: torch.nn.Module, choice: LoaderChoice,
                  weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Copy ``weights`` (HF names) into ``model``'s parameters through vLLM's own
    ``load_weights``; returns the number of vLLM parameters written. Raises if a
    parameter was not reached (a payload checked against the model's HF names reaches
    all of them: this is the guard against a model whose loader skips some)."""
    assert choice.loader == "in_place", choice
    with torch.no_grad():
        loaded = model.load_weights(_without_shared_head(model, weights))
    missing = choice.parameter_names - set(loaded)
    if missing:
        raise RuntimeError(f"the in-place weight load left {len(missing)} parameters unwritten, e.g. "
                           f"{sorted(missing)[:3]}; the model now mixes old and new weights. Fix: set "
                           "actor.cpu_gemm=packed (which loads through vLLM's layerwise reload) and report "
                           "the model architecture.")
    return len(loaded)


def _without_shared_head(model: torch.nn.Module,
                         weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` minus an ``lm_head.weight`` whose Parameter is the embedding's."""
    try:
        shared = model.get_parameter(_TIED_HEAD) is model.get_parameter(_EMBEDDING)
    except AttributeError:  # other names in this architecture: load whatever comes
        shared = False
    for name, tensor in weights:
        if shared and name == _TIED_HEAD:
            continue
        yield name, tensor
