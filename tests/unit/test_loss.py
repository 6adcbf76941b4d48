"""The learner loss against slow, obvious per-token Python loops."""

from __future__ import annotations

import math

import pytest
import torch

from asyncopd.config import LossConfig
from asyncopd.learner.loss import (
    LossInputs,
    compute_loss,
    importance_weights,
    opd_advantages,
    policy_gradient_loss,
)


def _random_inputs(seed: int, batch: int = 3, seq: int = 7) -> LossInputs:
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(batch, seq, generator=gen) * 4  # [B, T]
    mask = torch.rand(batch, seq, generator=gen) > 0.3
    mask[0, -2:] = False  # right padding
    mask[1, :] = False  # a row without response tokens
    mask[2, 0] = True
    # Padding holds garbage the loss must ignore.
    lp_behaviour = torch.where(mask, lp + torch.randn(batch, seq, generator=gen), torch.full_like(lp, math.inf))
    lp_teacher = torch.where(mask, -torch.rand(batch, seq, generator=gen) * 4, torch.full_like(lp, math.nan))
    return LossInputs(lp=lp.clone().requires_grad_(True), lp_old=lp.clone(), lp_behaviour=lp_behaviour,
                      lp_teacher=lp_teacher, mask=mask)


def _reference(inputs: LossInputs, cfg: LossConfig, global_num_tokens: int) -> dict[str, float]:
    """Per-token loops: loss value, d loss / d lp, and metrics."""
    loss, rkl, clip, ratio_sum, adv_sum, n = 0.0, 0.0, 0, 0.0, 0.0, 0
    grad = torch.zeros_like(inputs.lp_old)
    batch, seq = inputs.mask.shape
    for b in range(batch):
        for t in range(seq):
            if not inputs.mask[b, t]:
                continue
            lp_old = float(inputs.lp_old[b, t])
            adv = cfg.opd_coef * (float(inputs.lp_teacher[b, t]) - lp_old)
            ratio = math.exp(lp_old - float(inputs.lp_behaviour[b, t]))
            weight = min(ratio, cfg.tis_cap) if cfg.importance_correction == "tis" else 1.0
            loss += -weight * adv * 1.0 / global_num_tokens  # exp(lp - lp_old) == 1
            grad[b, t] = -weight * adv / global_num_tokens
            rkl += lp_old - float(inputs.lp_teacher[b, t])
            clip += int(cfg.importance_correction == "tis" and ratio > cfg.tis_cap)
            ratio_sum += ratio
            adv_sum += adv
            n += 1
    return {"loss": loss, "grad": grad, "learner/rkl": rkl / n, "learner/is_clip_frac": clip / n,
            "learner/is_ratio_mean": ratio_sum / n, "learner/adv_mean": adv_sum / n, "n": n}


@pytest.mark.parametrize("correction", ["tis", "none"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compute_loss_matches_reference(correction: str, seed: int) -> None:
    cfg = LossConfig(opd_coef=0.7, importance_correction=correction, tis_cap=1.5)
    inputs = _random_inputs(seed)
    global_num_tokens = int(inputs.mask.sum()) + 5  # other micro-batches / ranks hold more tokens
    out = compute_loss(inputs, cfg, global_num_tokens=global_num_tokens)
    ref = _reference(inputs, cfg, global_num_tokens)
    out.loss.backward()
    assert out.num_tokens == ref["n"]
    assert out.loss.item() == pytest.approx(ref["loss"], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(inputs.lp.grad, ref["grad"], rtol=1e-5, atol=1e-7)
    for key in ("learner/rkl", "learner/is_clip_frac", "learner/is_ratio_mean", "learner/adv_mean"):
        assert out.metrics[key].item() == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
    if correction == "tis":
        assert 0.0 < ref["learner/is_clip_frac"] < 1.0  # the cap is exercised


def test_micro_batch_contributions_sum_to_global_token_mean() -> None:
    cfg = LossConfig(importance_correction="tis", tis_cap=2.0)
    parts = [_random_inputs(seed) for seed in (3, 4)]
    total = sum(int(p.mask.sum()) for p in parts)
    summed = sum(compute_loss(p, cfg, global_num_tokens=total).loss.item() for p in parts)
    whole = LossInputs(*(torch.cat([getattr(p, f) for p in parts]) for f in
                         ("lp", "lp_old", "lp_behaviour", "lp_teacher", "mask")))
    assert summed == pytest.approx(compute_loss(whole, cfg, global_num_tokens=total).loss.item(), rel=1e-6)


def test_importance_weights_tis_and_none() -> None:
    lp_old = torch.tensor([[-1.0, -1.0, -1.0]])
    lp_behaviour = torch.tensor([[-1.0, -3.0, -0.5]])  # ratios 1, e^2, e^-0.5
    weights, clipped = importance_weights(lp_old, lp_behaviour, "tis", 2.0)
    torch.testing.assert_close(weights, torch.tensor([[1.0, 2.0, math.exp(-0.5)]]))
    assert clipped.tolist() == [[False, True, False]]
    weights, clipped = importance_weights(lp_old, lp_behaviour, "none", 2.0)
    assert weights.tolist() == [[1.0, 1.0, 1.0]] and not clipped.any()
    with pytest.raises(ValueError, match="importance_correction"):
        importance_weights(lp_old, lp_behaviour, "ppo", 2.0)


def test_opd_advantages_and_errors() -> None:
    adv = opd_advantages(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]), 2.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, -2.0]]))
    lp = torch.zeros(1, 2, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="global_num_tokens=0"):
        policy_gradient_loss(lp, lp.detach(), adv, torch.ones(1, 2), mask, global_num_tokens=0)
    with pytest.raises(ValueError, match="seq-mean"):
        policy_gradient_loss(lp, lp.detach(), adv, torch.ones(1, 2), mask, aggregation="seq-mean",
                             global_num_tokens=2)


def test_gradient_step_moves_log_probs_towards_teacher() -> None:
    """A token the teacher likes more than the student gains log-prob; one it likes
    less loses it."""
    logits = torch.zeros(1, 2, 5, requires_grad=True)  # [B, T, V]: two positions, uniform
    tokens = torch.tensor([[1, 3]])  # [B, T]
    mask = torch.ones(1, 2, dtype=torch.bool)

    def logprobs() -> torch.Tensor:
        return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]

    lp = logprobs()
    lp_teacher = lp.detach() + torch.tensor([[1.0, -1.0]])  # teacher: up on token 0, down on 1
    inputs = LossInputs(lp=lp, lp_old=lp.detach(), lp_behaviour=lp.detach(), lp_teacher=lp_teacher, mask=mask)
    compute_loss(inputs, LossConfig(), global_num_tokens=2).loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    after = logprobs().detach()
    assert after[0, 0] > lp[0, 0] + 1e-3
    assert after[0, 1] < lp[0, 1] - 1e-3
