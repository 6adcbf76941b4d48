"""Option parity with verl, on hand-worked values.

The expected numbers below were worked out by hand from the definitions in verl's
``verl/trainer/ppo/core_algos.py`` (``compute_policy_loss_vanilla`` with
``clip_ratio_c``, ``compute_reinforce_plus_plus_outcome_advantage`` with
``masked_whiten`` from ``verl/utils/torch_functional.py``, ``kl_penalty``), read at
volcengine/verl commit 012be9d; the working is in the comments. asyncopd runs with
the matching options: ``loss.ppo_clip_dual``, ``loss.advantage=reinforce_pp_token``,
``loss.kl_loss=k1|k3`` with the default ``loss.kl_clamp``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from asyncopd.config import LossConfig
from asyncopd.learner.advantages import sequence_advantages
from asyncopd.learner.loss import LossInputs, compute_loss


def one_row(lp: list[float], lp_old: list[float], lp_teacher: list[float] | None = None,
            adv: list[float] | None = None) -> LossInputs:
    """A single sequence of len(lp) response tokens; behaviour == lp_old (no IS weight)."""
    lp_t = torch.tensor([lp], dtype=torch.float32).requires_grad_(True)
    old = torch.tensor([lp_old], dtype=torch.float32)
    return LossInputs(lp=lp_t, lp_old=old, lp_behaviour=old.clone(),
                      lp_teacher=torch.tensor([lp_teacher or lp_old], dtype=torch.float32),
                      mask=torch.ones(1, len(lp), dtype=torch.bool),
                      adv_base=None if adv is None else torch.tensor([adv], dtype=torch.float32))


def test_dual_clip_matches_verl_clip_ratio_c() -> None:
    # verl, per token: l1 = -A*rho, l2 = -A*clip(rho, 0.8, 1.28), m = max(l1, l2);
    # for A < 0 the loss is min(m, -A*c) with c = 3, else m. token-mean over 5 tokens.
    #   A=-1,  rho=4   : l1=4,    l2=1.28,  m=4,     cap 3 -> 3      (dual-clipped)
    #   A=+2,  rho=4   : l1=-8,   l2=-2.56, m=-2.56          -> -2.56 (clipped)
    #   A=-1,  rho=0.5 : l1=0.5,  l2=0.8,   m=0.8,   cap 3 -> 0.8    (clipped)
    #   A=-.5, rho=2   : l1=1,    l2=0.64,  m=1,     cap 1.5 -> 1
    #   A=-2,  rho=3.5 : l1=7,    l2=2.56,  m=7,     cap 6 -> 6      (dual-clipped)
    # pg_loss = (3 - 2.56 + 0.8 + 1 + 6) / 5 = 1.648; pg_clipfrac (l2 > l1) = 2/5;
    # pg_clipfrac_lower (m > -A*c and A < 0) = 2/5. Gradient d/d lp of -A*rho where
    # neither clip holds: token 4 only, -A*rho / 5 = 0.5*2/5 = 0.2.
    rho = [4.0, 4.0, 0.5, 2.0, 3.5]
    adv = [-1.0, 2.0, -1.0, -0.5, -2.0]
    lp_old = [-1.0, -2.0, -0.5, -1.5, -3.0]
    inputs = one_row([o + math.log(r) for o, r in zip(lp_old, rho)], lp_old, adv=adv)
    cfg = LossConfig(kl_loss="none", pg_coef=1.0, advantage="grpo", opd_penalty_coef=0.0, importance_correction="none",
                     ppo_clip_low=0.2, ppo_clip_high=0.28, ppo_clip_dual=3.0)
    out = compute_loss(inputs, cfg, global_num_tokens=5)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(1.648, rel=1e-6)
    assert out.metrics["learner/ppo_clip_frac"].item() == pytest.approx(0.4)
    assert out.metrics["learner/ppo_dual_clip_frac"].item() == pytest.approx(0.4)
    torch.testing.assert_close(inputs.lp.grad, torch.tensor([[0.0, 0.0, 0.0, 0.2, 0.0]]))
    # Without the dual clip tokens 1 and 5 give 4 and 7 instead: (4 - 2.56 + .8 + 1 + 7) / 5.
    plain = compute_loss(one_row(inputs.lp.detach()[0].tolist(), lp_old, adv=adv),
                         LossConfig(kl_loss="none", pg_coef=1.0, advantage="grpo", opd_penalty_coef=0.0,
                                    importance_correction="none"),
                         global_num_tokens=5)
    assert plain.loss.item() == pytest.approx(10.24 / 5, rel=1e-6)


def test_reinforce_pp_token_matches_verl_token_whitening() -> None:
    # verl: outcome reward on the last response token, gamma = 1, so every token of a
    # sequence has return R; masked_whiten over all response tokens of the batch.
    # Rewards [1, 0, 0] with lengths [2, 1, 3] -> tokens [1, 1, 0, 0, 0, 0]: n = 6,
    # mean 1/3, squared deviations 2 * 4/9 + 4 * 1/9 = 4/3, masked mean 2/9, Bessel
    # 6/5 -> var 4/15; A = (R - 1/3) / sqrt(4/15 + 1e-8) = +1.2909944, -0.6454972.
    rewards, groups, lengths = np.array([1.0, 0.0, 0.0]), np.array([0, 1, 2]), np.array([2, 1, 3])
    got = sequence_advantages(rewards, groups, LossConfig(advantage="reinforce_pp_token"), response_lengths=lengths)
    torch.testing.assert_close(got, torch.tensor([1.2909944, -0.6454972, -0.6454972]), rtol=1e-6, atol=1e-6)
    # asyncopd's sequence-level form counts each sequence once: mean 1/3, std (ddof 1)
    # sqrt(1/3) -> (2/3) / 0.5773503 = 1.1547005, (-1/3) / 0.5773503 = -0.5773503.
    seq = sequence_advantages(rewards, groups, LossConfig(advantage="reinforce_pp"))
    torch.testing.assert_close(seq, torch.tensor([1.1547005, -0.5773503, -0.5773503]), rtol=1e-5, atol=1e-5)


def test_k3_default_clamp_matches_verl_low_var_kl_and_k1_is_unclamped() -> None:
    # verl low_var_kl: kl = ref - logprob clamped to +-20, kld = exp(kl) - kl - 1 clamped to +-10.
    #   lp=-1,  ref=-3   : kl=-2   -> e^-2 + 2 - 1 = 1.1353353
    #   lp=-5,  ref=-1   : kl=4    -> e^4 - 5 = 49.598 -> 10
    #   lp=-.5, ref=-.7  : kl=-0.2 -> e^-0.2 - 0.8 = 0.0187308
    lp, ref = [-1.0, -5.0, -0.5], [-3.0, -1.0, -0.7]
    k3 = compute_loss(one_row(lp, lp, lp_teacher=ref), LossConfig(kl_loss="k3", pg_coef=0.0),
                      global_num_tokens=3)
    assert LossConfig().kl_clamp == 10.0
    assert k3.loss.item() == pytest.approx((1.1353353 + 10.0 + 0.0187308) / 3, rel=1e-6)
    # verl's "kl"/k1 is logprob - ref, never clamped: -15 - (-1) = -14.
    k1 = compute_loss(one_row([-15.0], [-15.0], lp_teacher=[-1.0]), LossConfig(kl_loss="k1", pg_coef=0.0),
                      global_num_tokens=1)
    assert k1.loss.item() == pytest.approx(-14.0)
