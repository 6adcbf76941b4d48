"""The weight receiver's plan check and its stream (fake group; no vLLM, no processes)."""

import torch

from asyncopd.actor.weight_receiver import WeightReceiverExtension, check_plan
from asyncopd.transport.weights import plan_buckets
from asyncopd.types import TensorSpec, WeightUpdate

SHAPES = {"model.embed_tokens.weight": (10, 4), "model.layers.0.w": (4, 4), "model.norm.weight": (4,)}


def _update(specs, bucket_bytes=64) -> WeightUpdate:
    return WeightUpdate(policy_version=3, buckets=plan_buckets(specs, bucket_bytes))


def _specs(**overrides) -> list[TensorSpec]:
    shapes = {**SHAPES, **overrides}
    return [TensorSpec(name, shape, "float32") for name, shape in shapes.items() if shape is not None]


def test_a_complete_plan_passes_and_lm_head_is_optional_when_tied() -> None:
    assert check_plan(_update(_specs()), SHAPES, tied=True) == []
    with_head = _specs() + [TensorSpec("lm_head.weight", (10, 4), "float32")]
    assert check_plan(_update(with_head), SHAPES, tied=True) == []


def test_plan_problems_are_named() -> None:
    assert check_plan(_update(_specs(**{"model.layers.0.w": (4, 5)})), SHAPES, tied=True) == [
        "'model.layers.0.w' has shape (4, 5), expected (4, 4)"]
    assert check_plan(_update(_specs(**{"model.norm.weight": None})), SHAPES, tied=True) == [
        "1 parameters missing, e.g. ['model.norm.weight'] (an update must hold every parameter of the model)"]
    assert check_plan(_update(_specs() + [TensorSpec("x", (1,), "float32")]), SHAPES, tied=True) == [
        "unknown parameter name 'x'"]
    assert check_plan(_update(_specs() + [TensorSpec("lm_head.weight", (10, 4), "float32")]), SHAPES,
                      tied=False) == ["unknown parameter name 'lm_head.weight'"]


class CountingGroup:
    """Fills each bucket with its index; counts broadcasts."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.broadcasts = 0

    def broadcast(self, tensor: torch.Tensor) -> None:
        self.broadcasts += 1
        tensor.fill_(float(self.broadcasts))


def _receiver(add_tied_head: bool) -> tuple[WeightReceiverExtension, CountingGroup]:
    receiver = WeightReceiverExtension()
    group = CountingGroup()
    receiver.asyncopd_weight_group = group
    receiver.asyncopd_tied = True
    receiver.asyncopd_add_tied_head = add_tied_head
    return receiver, group


def test_stream_receives_one_bucket_at_a_time() -> None:
    receiver, group = _receiver(add_tied_head=False)
    update = _update(_specs(), bucket_bytes=64)  # 160 B embed, 64 B layer, 16 B norm: 3 buckets
    assert len(update.buckets) == 3
    stream = receiver._asyncopd_stream(update)
    name, tensor = next(stream)
    assert (name, group.broadcasts) == ("model.embed_tokens.weight", 1)  # nothing received ahead
    assert torch.equal(tensor, torch.full((10, 4), 1.0))
    rest = list(stream)
    assert [n for n, _ in rest] == ["model.layers.0.w", "model.norm.weight"] and group.broadcasts == 3


def test_stream_adds_the_tied_head_on_vllm_cpu_only() -> None:
    receiver, _ = _receiver(add_tied_head=True)
    items = list(receiver._asyncopd_stream(_update(_specs())))
    assert items[-1][0] == "lm_head.weight" and items[-1][1] is items[0][1]
    receiver, _ = _receiver(add_tied_head=False)
    assert "lm_head.weight" not in [n for n, _ in receiver._asyncopd_stream(_update(_specs()))]
