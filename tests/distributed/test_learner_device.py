"""The learner's device module on 2 gloo CPU ranks: the student built without a full
copy on every rank matches a plain load; bf16 mixed precision and activation
checkpointing train like float32 (bf16 within a tolerance: notes/fsdp-cpu.md saw
up to ~0.1 of drift over 8 steps)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from asyncopd.learner.device import resolve_param_dtype
from asyncopd.learner.model import load_student
from asyncopd.tasks.tiny import save_tiny_model

pytestmark = pytest.mark.distributed


def _harness():
    spec = importlib.util.spec_from_file_location("_asyncopd_fsdp_harness", Path(__file__).with_name("test_fsdp.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    harness = _harness()
    harness.WORKER = Path(__file__).with_name("_device_worker.py")
    harness.TIMEOUT_S = 150.0
    model_dir = save_tiny_model(tmp_path_factory.mktemp("student"), seed=0)
    out_dir = tmp_path_factory.mktemp("device")
    harness._run_ranks(model_dir, out_dir)
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(harness.WORLD_SIZE)]
    for result in results:
        result["model_dir"] = model_dir
    return results


def test_rank0_load_and_broadcast_equals_a_plain_load(ranks: list[dict]) -> None:
    reference = load_student(ranks[0]["model_dir"])
    expected = reference.state_dict()
    for result in ranks:
        assert set(result["weights"]) == set(expected)
        for name, tensor in result["weights"].items():
            assert torch.equal(tensor, expected[name]), name
        # Non-persistent buffers (rotary inv_freq) are rank 0's, not to_empty's garbage.
        buffers = dict(reference.named_buffers())
        assert result["buffers"], "the tiny model has a rotary buffer"
        for name, buffer in result["buffers"].items():
            assert torch.equal(buffer, buffers[name]), name


def test_several_ranks_always_use_fsdp2(ranks: list[dict]) -> None:
    # The single-rank seam (device.needs_fsdp) leaves only a 1-rank float32 student plain.
    for result in ranks:
        assert result["fp32_fsdp"] and result["fp32_ckpt_fsdp"] and result["bf16_fsdp"]


def test_activation_checkpointing_does_not_change_the_losses(ranks: list[dict]) -> None:
    for result in ranks:
        assert result["fp32_ckpt"] == pytest.approx(result["fp32"], abs=1e-6)


def test_bf16_steps_track_fp32_within_tolerance(ranks: list[dict]) -> None:
    fp32, bf16 = torch.tensor(ranks[0]["fp32"]), torch.tensor(ranks[0]["bf16"])
    assert (bf16 - fp32).abs().max() < 0.15
    assert not torch.equal(bf16, fp32)  # bf16 compute really ran
    assert ranks[0]["bf16_master_dtype"] == torch.float32  # master weights stay fp32
    assert ranks[0]["bf16"] == ranks[1]["bf16"]  # metrics agree over ranks


def test_param_dtype_auto_is_bf16_on_gpu_only() -> None:
    assert resolve_param_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    assert resolve_param_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_param_dtype("float32", torch.device("cuda:0")) == torch.float32
