"""The in-place weight loader and the receiver's choice between it and the reload (fakes; no vLLM)."""

from __future__ import annotations

import pytest
import torch

from asyncopd.actor.weight_loading import LoaderChoice, load_in_place, plain_gemm_problem
from asyncopd.actor.weight_receiver import WeightReceiverExtension


class Linear(torch.nn.Module):
    """A layer as vLLM's CPU build leaves it: a weight and the ``cpu_linear`` it multiplies with."""

    def __init__(self, weight: torch.Tensor, gemm) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.cpu_linear = gemm


def torch_fallback():
    # The same body as vLLM's fallback in dispatch_cpu_unquantized_gemm.
    return lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)


def test_plain_gemm_is_recognised_and_packed_layers_are_named() -> None:
    plain = torch.nn.ModuleDict({"a": Linear(torch.ones(2, 2), torch.nn.functional.linear),
                                 "b": Linear(torch.ones(2, 2), torch_fallback())})
    assert plain_gemm_problem(plain) is None
    handle = object()
    packed = torch.nn.ModuleDict({"a": Linear(torch.ones(2, 2), torch_fallback()),
                                  "b": Linear(torch.ones(2, 2), lambda x, weight, bias: torch.ops.mm(handle, x))})
    assert "layer 'b' multiplies with" in plain_gemm_problem(packed)
    emptied = torch.nn.ModuleDict({"c": Linear(torch.empty(0), torch_fallback())})
    assert plain_gemm_problem(emptied) == "layer 'c' holds no weight (vLLM moved it into a packed kernel)"


class TiedModel(torch.nn.Module):
    """vLLM-like: the head shares the embedding's Parameter; load_weights copies and
    returns the names it wrote, as vLLM's models do."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Module()
        self.model.embed_tokens.weight = torch.nn.Parameter(torch.zeros(4, 2), requires_grad=False)
        self.model.norm = torch.nn.Module()
        self.model.norm.weight = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
        self.lm_head = torch.nn.Module()
        self.lm_head.weight = self.model.embed_tokens.weight
        self.seen: list[str] = []

    def load_weights(self, weights) -> set[str]:
        params = dict(self.named_parameters(remove_duplicate=False))
        for name, tensor in weights:
            self.seen.append(name)
            params[name].copy_(tensor)
        return set(self.seen)


def choice_for(model: torch.nn.Module) -> LoaderChoice:
    return LoaderChoice("in_place", "test", parameter_names=frozenset(n for n, _ in model.named_parameters()))


def test_in_place_load_copies_and_skips_a_head_that_is_the_embedding() -> None:
    model = TiedModel()
    embed, norm = torch.full((4, 2), 3.0), torch.full((2,), 5.0)
    written = load_in_place(model, choice_for(model), iter([("lm_head.weight", embed * 0 + 7),
                                                            ("model.embed_tokens.weight", embed),
                                                            ("model.norm.weight", norm)]))
    assert written == 2 and model.seen == ["model.embed_tokens.weight", "model.norm.weight"]
    assert torch.equal(model.lm_head.weight, embed) and torch.equal(model.model.norm.weight, norm)


def test_in_place_load_that_misses_a_parameter_fails_with_the_fix() -> None:
    model = TiedModel()
    with pytest.raises(RuntimeError, match=r"left 1 parameters unwritten, e.g. \['model.norm.weight'\].*"
                                           r"actor.cpu_gemm=packed"):
        load_in_place(model, choice_for(model), iter([("model.embed_tokens.weight", torch.ones(4, 2))]))


class FakeWorker(WeightReceiverExtension):
    """The two ways into the model, recorded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model_runner = self
        self._model = model
        self.reloaded: list[str] = []

    def get_model(self) -> torch.nn.Module:
        return self._model

    def reload_weights(self, weights_iterator) -> None:
        self.reloaded.extend(name for name, _ in weights_iterator)


def test_the_receiver_loads_with_the_chosen_loader() -> None:
    items = [("model.embed_tokens.weight", torch.ones(4, 2)), ("model.norm.weight", torch.ones(2))]
    worker = FakeWorker(TiedModel())
    worker.asyncopd_load_weights(items)  # no choice made: vLLM's reload
    assert worker.reloaded == ["model.embed_tokens.weight", "model.norm.weight"] and worker._model.seen == []
    worker = FakeWorker(TiedModel())
    worker.asyncopd_loader = choice_for(worker._model)
    worker.asyncopd_load_weights(items)
    assert worker.reloaded == [] and torch.equal(worker._model.model.norm.weight, torch.ones(2))
    worker.asyncopd_loader = LoaderChoice("reload", "test")
    worker.asyncopd_load_weights(items)
    assert len(worker.reloaded) == 2
