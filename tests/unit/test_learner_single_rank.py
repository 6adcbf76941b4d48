"""The learner's single-rank seam (asyncopd.learner.device.needs_fsdp): one float32
rank trains a plain module, with the same losses, weights and weight stream as
FSDP2 on a 1-rank mesh; mixed precision and several ranks keep FSDP2 (the 2-rank
case is checked in tests/distributed/test_learner_device.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from asyncopd.config import LearnerConfig, LossConfig
from asyncopd.learner.batching import TrainSample
from asyncopd.learner.device import build_student, needs_fsdp
from asyncopd.learner.model import iter_full_weights, load_student, make_mesh, shard_model
from asyncopd.learner.train import make_optimizer, train_step
from asyncopd.tasks.tiny import save_tiny_model

LOSS_CFG = LossConfig(kl_loss="topk", pg_coef=0.0)
LEARNER_CFG = LearnerConfig(lr=1e-3, max_grad_norm=0.5, micro_batch_tokens=64)


def _samples(top_k: int = 4) -> list[TrainSample]:
    rng = np.random.default_rng(0)
    samples = []
    for prompt_len, response_len in [(6, 5), (3, 8), (7, 2), (4, 4)]:
        samples.append(TrainSample(
            prompt_ids=rng.integers(3, 98, prompt_len).astype(np.int32),
            response_ids=rng.integers(3, 98, response_len).astype(np.int32),
            behaviour_logprobs=(-4.0 + rng.standard_normal(response_len)).astype(np.float32),
            teacher_logprobs=(-4.0 + rng.standard_normal(response_len)).astype(np.float32),
            topk_ids=rng.integers(0, 98, (response_len, top_k)).astype(np.int32),
            topk_logprobs=(-3.0 + rng.standard_normal((response_len, top_k))).astype(np.float32)))
    return samples


@pytest.fixture
def one_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_needs_fsdp_only_for_several_ranks_or_mixed_precision() -> None:
    assert not needs_fsdp(1, torch.float32)
    assert needs_fsdp(1, torch.bfloat16)  # FSDP's MixedPrecisionPolicy does the casts
    assert needs_fsdp(2, torch.float32)
    assert needs_fsdp(4, torch.bfloat16)


def test_one_float32_rank_trains_a_plain_module_like_fsdp(one_rank_group, tmp_path) -> None:
    model_dir = save_tiny_model(tmp_path / "student", seed=0)
    plain = build_student(model_dir, torch.device("cpu"), torch.float32)
    assert not isinstance(plain, FSDPModule)
    assert isinstance(build_student(model_dir, torch.device("cpu"), torch.bfloat16), FSDPModule)
    sharded = shard_model(load_student(model_dir), make_mesh("cpu"))
    losses = {}
    for name, model in (("plain", plain), ("fsdp", sharded)):
        optimizer = make_optimizer(model, LEARNER_CFG)
        losses[name] = [train_step(model, optimizer, _samples(), LOSS_CFG, LEARNER_CFG, top_k=4)["learner/loss"]
                        for _ in range(3)]
    assert losses["plain"] == pytest.approx(losses["fsdp"], abs=1e-6)
    assert losses["plain"][2] != losses["plain"][0]  # the steps really trained
    plain_weights, fsdp_weights = dict(iter_full_weights(plain)), dict(iter_full_weights(sharded))
    assert set(plain_weights) == set(fsdp_weights)
    for name, tensor in plain_weights.items():
        torch.testing.assert_close(tensor, fsdp_weights[name], atol=1e-6, rtol=0, msg=name)
