"""The learner loss against a slow, obvious reference: Python loops over tokens,
float64 arithmetic, gradients written out by hand."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

from asyncopd.config import LossConfig
from asyncopd.learner.advantages import discounted_sum, sequence_advantages
from asyncopd.learner.loss import (
    LossInputs,
    aggregation_weights,
    compute_loss,
    topk_reverse_kl,
)

ADVANTAGES = ["opd", "grpo", "reinforce_pp", "reinforce_pp_token"]
CORRECTIONS = ["tis", "seq_tis", "mask", "decoupled_ppo", "none"]
AGGREGATIONS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
KL_LOSSES = ["none", "k1", "k2", "k3", "topk", "full"]
MAX_LOG_RATIO, TAIL_EPS = 20.0, 1e-6  # the module's clamps, restated


# --- inputs -----------------------------------------------------------------------------

def make_inputs(seed: int, *, batch: int = 4, seq: int = 7, k: int = 3, vocab: int = 10) -> LossInputs:
    """Random inputs with right padding, a prompt prefix, a row without response
    tokens, a row with gaps, lp != lp_old, and inf/nan in every padded slot."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[0, 1:5] = True  # prompt, response, right padding
    mask[2] = torch.rand(seq, generator=gen) > 0.4  # gaps
    mask[2, [0, -1]] = True
    mask[3] = True  # no padding at all; row 1 has no response token
    lp_old = -torch.rand(batch, seq, generator=gen) * 3 - 0.05
    lp = lp_old + 0.4 * torch.randn(batch, seq, generator=gen)  # PPO ratios outside [0.8, 1.28]
    lp_behaviour = lp_old + 0.8 * torch.randn(batch, seq, generator=gen)  # IS ratios around the caps
    lp_teacher = -torch.rand(batch, seq, generator=gen) * 3
    adv_base = torch.randn(batch, 1, generator=gen).expand(batch, seq)
    entropy = torch.rand(batch, seq, generator=gen) * 2
    # Top-k: K = 2k candidate ids out of a vocabulary, the first n_valid of them valid.
    width = 2 * k
    p_student = torch.softmax(1.5 * torch.randn(batch, seq, vocab, generator=gen), -1)
    p_teacher = torch.softmax(1.5 * torch.randn(batch, seq, vocab, generator=gen), -1)
    ids = torch.argsort(torch.rand(batch, seq, vocab, generator=gen), -1)[..., :width]
    n_valid = torch.randint(k, width + 1, (batch, seq, 1), generator=gen)
    topk_valid = torch.arange(width) < n_valid  # [B, T, K]
    topk_lp = torch.where(topk_valid, p_student.gather(-1, ids).log(), -math.inf)
    topk_lp_teacher = torch.where(topk_valid, p_teacher.gather(-1, ids).log(), math.nan)
    full_kl = torch.rand(batch, seq, generator=gen) * 2  # the full-vocabulary KL, as the learner's pass gives it

    def garbage(values: torch.Tensor, fill: float) -> torch.Tensor:
        pad = ~mask if values.dim() == 2 else ~mask.unsqueeze(-1).expand_as(values)
        return torch.where(pad, torch.full_like(values, fill), values)

    return LossInputs(lp=garbage(lp, math.nan).requires_grad_(True), lp_old=garbage(lp_old, math.inf),
                      lp_behaviour=garbage(lp_behaviour, -math.inf), lp_teacher=garbage(lp_teacher, math.nan),
                      mask=mask, adv_base=garbage(adv_base, math.nan),
                      entropy=garbage(entropy, math.inf).requires_grad_(True),
                      topk_lp=garbage(topk_lp, math.nan).requires_grad_(True),
                      topk_lp_teacher=garbage(topk_lp_teacher, math.inf), topk_valid=topk_valid,
                      full_kl=garbage(full_kl, math.nan).requires_grad_(True))


def make_cfg(**overrides: object) -> LossConfig:
    base = dict(kl_loss="none", opd_coef=0.7, opd_penalty_coef=0.3, pg_coef=0.6, kl_loss_coef=0.4, entropy_coef=0.05,
                tis_cap=1.5, is_mask_low=0.6, is_mask_high=1.6, ppo_clip_low=0.2, ppo_clip_high=0.28)
    base.update(overrides)
    return LossConfig(**base)


# --- the reference ----------------------------------------------------------------------

@dataclass
class Reference:
    loss: float = 0.0
    grad_lp: torch.Tensor | None = None
    grad_entropy: torch.Tensor | None = None
    grad_topk: torch.Tensor | None = None
    grad_full: torch.Tensor | None = None
    sums: dict[str, float] = field(default_factory=dict)
    num_tokens: int = 0

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def metrics(self) -> dict[str, float]:
        out = {key: value / max(self.num_tokens, 1) for key, value in self.sums.items()}
        out["learner/adv_std"] = math.sqrt(max(out["learner/adv_sq_mean"] - out["learner/adv_mean"] ** 2, 0.0))
        return out


def ref_advantage(cfg: LossConfig, signal: list[float], on: list[bool], t: int, adv_base: float) -> float:
    """sum over later response tokens s of discount^(response tokens in (t, s]) * r_s."""
    total, steps = 0.0, 0
    for s in range(t, len(signal)):
        if on[s]:
            total += (cfg.discount**steps if steps else 1.0) * signal[s]
            steps += 1
    return cfg.opd_coef * total if cfg.advantage == "opd" else adv_base + cfg.opd_penalty_coef * total


def ref_weight(cfg: LossConfig, log_ratio: float, seq_log_ratio: float) -> tuple[float, bool, bool]:
    """(w, capped, dropped) of one token."""
    ratio = math.exp(min(log_ratio, MAX_LOG_RATIO))
    if cfg.importance_correction in ("tis", "decoupled_ppo"):
        return min(ratio, cfg.tis_cap), ratio > cfg.tis_cap, False
    if cfg.importance_correction == "seq_tis":
        seq_ratio = math.exp(min(seq_log_ratio, MAX_LOG_RATIO))
        return min(seq_ratio, cfg.tis_cap), seq_ratio > cfg.tis_cap, False
    if cfg.importance_correction == "mask":
        kept = cfg.is_mask_low <= ratio <= cfg.is_mask_high
        return float(kept), False, not kept
    return 1.0, False, False


def ref_policy_gradient(cfg: LossConfig, lp: float, lp_old: float, adv: float,
                        w: float) -> tuple[float, float, bool, bool]:
    """(value, d value / d lp, PPO-clipped, dual-clipped) of -w * min(rho A, clip(rho) A),
    the unweighted term capped at -c A for A < 0 with the dual clip c."""
    log_rho = lp - lp_old
    rho = math.exp(min(max(log_rho, -MAX_LOG_RATIO), MAX_LOG_RATIO))
    d_rho = rho if abs(log_rho) < MAX_LOG_RATIO else 0.0
    value, grad, clipped = -rho * adv, -d_rho * adv, False
    if cfg.ppo_clip_low is not None or cfg.ppo_clip_high is not None:
        low = 1 - cfg.ppo_clip_low if cfg.ppo_clip_low is not None else -math.inf
        high = 1 + cfg.ppo_clip_high if cfg.ppo_clip_high is not None else math.inf
        clipped_rho = min(max(rho, low), high)
        if clipped_rho * adv < rho * adv:  # the clipped branch wins and is flat in lp
            value, grad, clipped = -clipped_rho * adv, 0.0, True
    dual = cfg.ppo_clip_dual is not None and adv < 0 and value > -cfg.ppo_clip_dual * adv
    if dual:
        value, grad = -cfg.ppo_clip_dual * adv, 0.0
    return w * value, w * grad, clipped, dual


def ref_sampled_kl(cfg: LossConfig, lp: float, lp_teacher: float) -> tuple[float, float]:
    """(value, d value / d lp) of the k1/k2/k3 estimator, k3 clamped (k1, k2 never)."""
    d = lp - lp_teacher
    if cfg.kl_loss == "k1":
        value, grad = d, 1.0
    elif cfg.kl_loss == "k2":
        value, grad = 0.5 * d * d, d
    else:
        u = min(max(-d, -MAX_LOG_RATIO), MAX_LOG_RATIO)
        value, grad = math.exp(u) - u - 1, (1 - math.exp(u)) if abs(d) < MAX_LOG_RATIO else 0.0
    if cfg.kl_loss == "k3" and cfg.kl_clamp is not None and abs(value) > cfg.kl_clamp:
        return math.copysign(cfg.kl_clamp, value), 0.0
    return value, grad


def ref_topk_kl(lp_s: list[float], lp_t: list[float], valid: list[bool]) -> tuple[float, list[float]]:
    """(value, d value / d lp_s(i)) of the union + tail reverse KL of one token."""
    head, mass_s, mass_t = 0.0, 0.0, 0.0
    for i, ok in enumerate(valid):
        if ok:
            head += math.exp(lp_s[i]) * (lp_s[i] - lp_t[i])
            mass_s += math.exp(lp_s[i])
            mass_t += math.exp(lp_t[i])
    tail_s, tail_t = 1 - mass_s, 1 - mass_t
    log_gap = math.log(max(tail_s, TAIL_EPS)) - math.log(max(tail_t, TAIL_EPS))
    value = head + max(tail_s, 0.0) * log_gap
    d_mass = -(log_gap if tail_s > 0 else 0.0) - (1.0 if tail_s > TAIL_EPS else 0.0)  # d tail term / d mass_s
    grads = [math.exp(lp_s[i]) * (lp_s[i] - lp_t[i] + 1 + d_mass) if ok else 0.0 for i, ok in enumerate(valid)]
    return value, grads


def reference(inputs: LossInputs, cfg: LossConfig, num_tokens: int, num_seqs: int) -> Reference:
    mask = inputs.mask.tolist()
    lp, lp_old = inputs.lp.tolist(), inputs.lp_old.tolist()
    lp_behaviour, lp_teacher = inputs.lp_behaviour.tolist(), inputs.lp_teacher.tolist()
    adv_base, entropy = inputs.adv_base.tolist(), inputs.entropy.tolist()
    topk_lp, topk_lp_teacher = inputs.topk_lp.tolist(), inputs.topk_lp_teacher.tolist()
    topk_valid = inputs.topk_valid.tolist()
    full_kl = inputs.full_kl.tolist()
    ref = Reference(grad_lp=torch.zeros(inputs.mask.shape, dtype=torch.float64),
                    grad_full=torch.zeros(inputs.mask.shape, dtype=torch.float64),
                    grad_entropy=torch.zeros(inputs.mask.shape, dtype=torch.float64),
                    grad_topk=torch.zeros(inputs.topk_lp.shape, dtype=torch.float64))
    for b, on in enumerate(mask):
        n_b = sum(on)
        signal = [lp_teacher[b][t] - lp_old[b][t] if on[t] else 0.0 for t in range(len(on))]
        seq_log_ratio = sum(lp_old[b][t] - lp_behaviour[b][t] for t in range(len(on)) if on[t])
        for t in range(len(on)):
            if not on[t]:
                continue
            scale = {"token-mean": 1 / num_tokens, "seq-mean-token-mean": 1 / (num_seqs * n_b),
                     "seq-mean-token-sum": 1 / num_seqs}[cfg.aggregation]
            adv = ref_advantage(cfg, signal, on, t, adv_base[b][t])
            w, capped, dropped = ref_weight(cfg, lp_old[b][t] - lp_behaviour[b][t], seq_log_ratio)
            pg, d_pg, ppo_clipped, dual_clipped = ref_policy_gradient(cfg, lp[b][t], lp_old[b][t], adv, w)
            kl, d_kl = 0.0, 0.0
            if cfg.kl_loss in ("k1", "k2", "k3"):
                kl, d_kl = ref_sampled_kl(cfg, lp[b][t], lp_teacher[b][t])
            elif cfg.kl_loss == "topk":
                kl, d_topk = ref_topk_kl(topk_lp[b][t], topk_lp_teacher[b][t], topk_valid[b][t])
                ref.grad_topk[b, t] = torch.tensor(d_topk, dtype=torch.float64) * scale * cfg.kl_loss_coef
            elif cfg.kl_loss == "full":  # exact, so never clamped; its gradient goes to full_kl
                kl = full_kl[b][t]
                ref.grad_full[b, t] = scale * cfg.kl_loss_coef
            ref.loss += scale * (cfg.pg_coef * pg + cfg.kl_loss_coef * kl - cfg.entropy_coef * entropy[b][t])
            ref.grad_lp[b, t] = scale * (cfg.pg_coef * d_pg + cfg.kl_loss_coef * d_kl)
            ref.grad_entropy[b, t] = -scale * cfg.entropy_coef
            u = min(max(signal[t], -MAX_LOG_RATIO), MAX_LOG_RATIO)
            ref.num_tokens += 1
            for key, value in (("pg_loss", pg), ("kl_loss", kl), ("rkl", -signal[t]),
                               ("kl_k3", math.exp(u) - u - 1),
                               ("is_ratio_mean", math.exp(min(lp_old[b][t] - lp_behaviour[b][t], MAX_LOG_RATIO))),
                               ("is_clip_frac", capped), ("is_mask_frac", dropped), ("ppo_clip_frac", ppo_clipped),
                               ("ppo_dual_clip_frac", dual_clipped),
                               ("entropy", entropy[b][t]), ("adv_mean", adv), ("adv_sq_mean", adv * adv)):
                ref.add(f"learner/{key}", float(value))
    return ref


# --- comparisons ------------------------------------------------------------------------

def grad_or_zeros(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.grad.double() if tensor.grad is not None else torch.zeros_like(tensor, dtype=torch.float64)


def check_against_reference(inputs: LossInputs, cfg: LossConfig, *, extra_tokens: int = 5,
                            extra_seqs: int = 2) -> Reference:
    """Run compute_loss and the reference (as one micro-batch of a larger batch) and
    compare loss, gradients w.r.t. lp / entropy / topk_lp, and every metric."""
    num_tokens = int(inputs.mask.sum()) + extra_tokens
    num_seqs = int(inputs.mask.any(-1).sum()) + extra_seqs
    out = compute_loss(inputs, cfg, global_num_tokens=num_tokens, global_num_seqs=num_seqs)
    ref = reference(inputs, cfg, num_tokens, num_seqs)
    out.loss.backward()
    assert out.num_tokens == ref.num_tokens
    assert out.loss.item() == pytest.approx(ref.loss, rel=1e-5, abs=1e-6)  # float32 sums of O(1) terms
    tolerance = dict(rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grad_or_zeros(inputs.lp), ref.grad_lp, **tolerance)
    torch.testing.assert_close(grad_or_zeros(inputs.entropy), ref.grad_entropy, **tolerance)
    torch.testing.assert_close(grad_or_zeros(inputs.topk_lp), ref.grad_topk, **tolerance)
    torch.testing.assert_close(grad_or_zeros(inputs.full_kl), ref.grad_full, **tolerance)
    expected = ref.metrics()
    assert set(out.metrics) == set(expected)
    for key, value in expected.items():
        assert out.metrics[key].item() == pytest.approx(value, rel=1e-4, abs=1e-6), key
        assert not out.metrics[key].requires_grad, key
    return ref


@pytest.mark.parametrize("dual_clip", [None, 1.5])
@pytest.mark.parametrize("discount", [0.0, 0.8])
@pytest.mark.parametrize("kl_loss", KL_LOSSES)
@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize("advantage", ADVANTAGES)
def test_every_combination_matches_reference(advantage: str, correction: str, aggregation: str, kl_loss: str,
                                             discount: float, dual_clip: float | None) -> None:
    seed = len(advantage) + 7 * len(correction) + 3 * len(aggregation) + len(kl_loss)
    cfg = make_cfg(advantage=advantage, importance_correction=correction, aggregation=aggregation,
                   kl_loss=kl_loss, discount=discount, ppo_clip_dual=dual_clip)
    check_against_reference(make_inputs(seed), cfg)


@pytest.mark.parametrize("dual_clip", [None, 1.5])
@pytest.mark.parametrize(("low", "high"), [(None, None), (0.2, None), (None, 0.28)])
@pytest.mark.parametrize("correction", ["tis", "seq_tis", "mask", "none"])
def test_ppo_clip_bounds_can_be_disabled(correction: str, low: float | None, high: float | None,
                                         dual_clip: float | None) -> None:
    cfg = make_cfg(importance_correction=correction, ppo_clip_low=low, ppo_clip_high=high, advantage="grpo",
                   ppo_clip_dual=dual_clip)
    check_against_reference(make_inputs(11), cfg)


@pytest.mark.parametrize("kl_loss", ["k1", "k2", "k3"])
def test_kl_clamp_matches_reference(kl_loss: str) -> None:
    """The clamp acts on k3 only (verl's low_var_kl); k1 and k2 are never clamped."""
    inputs = make_inputs(12)
    cfg = make_cfg(kl_loss=kl_loss, kl_clamp=0.3, pg_coef=0.0)
    check_against_reference(inputs, cfg)
    unclamped = check_against_reference(make_inputs(12), make_cfg(kl_loss=kl_loss, kl_clamp=None, pg_coef=0.0))
    clamped = reference(inputs, cfg, 30, 5)
    assert (clamped.metrics()["learner/kl_loss"] != unclamped.metrics()["learner/kl_loss"]) == (kl_loss == "k3")
    # The clamp is exercised: some tokens sit beyond it, some inside.
    values = [ref_sampled_kl(make_cfg(kl_loss=kl_loss), lp, lt)[0] for lp, lt, on in
              zip(inputs.lp.flatten().tolist(), inputs.lp_teacher.flatten().tolist(), inputs.mask.flatten().tolist())
              if on]
    assert any(abs(v) > 0.3 for v in values) and any(abs(v) < 0.3 for v in values)


def test_dual_clip_is_exercised_by_the_fixture() -> None:
    metrics = reference(make_inputs(3), make_cfg(advantage="grpo", ppo_clip_dual=1.5), 10, 3).metrics()
    assert 0.02 < metrics["learner/ppo_dual_clip_frac"] < 0.5


def test_fixture_exercises_every_branch() -> None:
    """The random inputs reach the TIS cap, both sides of the IS mask band, the PPO
    clip, and top-k tails of real mass, so the combination test checks them."""
    inputs = make_inputs(3)
    for correction, key in (("tis", "learner/is_clip_frac"), ("mask", "learner/is_mask_frac")):
        metrics = reference(inputs, make_cfg(importance_correction=correction), 10, 3).metrics()
        assert 0.1 < metrics[key] < 0.9, (correction, metrics[key])
    metrics = reference(inputs, make_cfg(), 10, 3).metrics()
    assert 0.1 < metrics["learner/ppo_clip_frac"] < 0.9


def test_padding_never_reaches_loss_metrics_or_gradients() -> None:
    """Rows and positions without response tokens contribute nothing, whatever they hold."""
    inputs = make_inputs(5)
    cfg = make_cfg(kl_loss="topk", importance_correction="seq_tis", aggregation="seq-mean-token-mean")
    out = compute_loss(inputs, cfg, global_num_tokens=40, global_num_seqs=6)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(value) for value in out.metrics.values())
    pad = ~inputs.mask
    for grad in (inputs.lp.grad, inputs.entropy.grad):
        assert torch.isfinite(grad).all() and (grad[pad] == 0).all()
    assert torch.isfinite(inputs.topk_lp.grad).all()
    assert (inputs.topk_lp.grad[~(inputs.topk_valid & inputs.mask.unsqueeze(-1))] == 0).all()


def test_empty_micro_batch_contributes_zero_with_a_graph() -> None:
    """A rank's padding-only micro-batch (every rank must run backward) adds 0."""
    inputs = make_inputs(6)
    empty = LossInputs(lp=inputs.lp, lp_old=inputs.lp_old, lp_behaviour=inputs.lp_behaviour,
                       lp_teacher=inputs.lp_teacher, mask=torch.zeros_like(inputs.mask), entropy=inputs.entropy)
    for aggregation in AGGREGATIONS:
        out = compute_loss(empty, make_cfg(aggregation=aggregation), global_num_tokens=9, global_num_seqs=2)
        assert out.loss.item() == 0.0 and out.loss.requires_grad and out.num_tokens == 0
        assert all(value.item() == 0.0 for value in out.metrics.values())


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_micro_batch_contributions_sum_to_the_global_aggregate(aggregation: str) -> None:
    cfg = make_cfg(aggregation=aggregation, kl_loss="k3", advantage="grpo", discount=0.5)
    parts = [make_inputs(seed) for seed in (3, 4)]
    num_tokens = sum(int(p.mask.sum()) for p in parts)
    num_seqs = sum(int(p.mask.any(-1).sum()) for p in parts)
    summed = sum(compute_loss(p, cfg, global_num_tokens=num_tokens, global_num_seqs=num_seqs).loss.item()
                 for p in parts)
    whole = LossInputs(**{name: torch.cat([getattr(p, name).detach() for p in parts])
                          for name in LossInputs.__slots__})
    alone = compute_loss(whole, cfg, global_num_tokens=num_tokens).loss.item()  # counts its own sequences
    assert summed == pytest.approx(alone, rel=1e-6)


def test_aggregation_weights_by_hand() -> None:
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    expected = {
        "token-mean": [[1 / 10, 1 / 10, 0], [0, 0, 0], [1 / 10, 1 / 10, 1 / 10]],
        "seq-mean-token-mean": [[1 / 8, 1 / 8, 0], [0, 0, 0], [1 / 12, 1 / 12, 1 / 12]],
        "seq-mean-token-sum": [[1 / 4, 1 / 4, 0], [0, 0, 0], [1 / 4, 1 / 4, 1 / 4]],
    }
    for aggregation, weights in expected.items():
        got = aggregation_weights(mask, aggregation, global_num_tokens=10, global_num_seqs=4)
        torch.testing.assert_close(got, torch.tensor(weights))
    local = aggregation_weights(mask, "seq-mean-token-sum", global_num_tokens=5)  # 2 sequences here
    torch.testing.assert_close(local[0], torch.tensor([0.5, 0.5, 0.0]))


@pytest.mark.parametrize("discount", [0.0, 0.5, 0.99, 1.0])
def test_discounted_sum_across_blocks(discount: float) -> None:
    """Long rows (several blocks) with gaps, against the per-token loop."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(2, 300, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 300, generator=gen) > 0.2
    mask[1, 140:] = False  # a response ending inside the second block
    got = discounted_sum(torch.where(mask, values, torch.full_like(values, math.nan)), mask, discount)
    cfg = make_cfg(discount=discount, opd_coef=1.0)
    for b in range(2):
        on, row = mask[b].tolist(), values[b].tolist()
        want = [ref_advantage(cfg, row, on, t, 0.0) if on[t] else 0.0 for t in range(300)]
        torch.testing.assert_close(got[b], torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_topk_kl_with_full_support_is_the_exact_reverse_kl() -> None:
    """With every vocabulary id a candidate the tail is empty: the value and the
    gradient w.r.t. the logits are those of the dense reverse KL."""
    gen = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(4, 16, generator=gen)).requires_grad_(True)
    teacher = torch.log_softmax(3 * torch.randn(4, 16, generator=gen), -1)
    student = torch.log_softmax(logits, -1)
    kl = topk_reverse_kl(student.unsqueeze(0), teacher.unsqueeze(0), torch.ones(1, 4, 16, dtype=torch.bool))
    dense = (student.exp() * (student - teacher)).sum(-1)
    torch.testing.assert_close(kl[0], dense, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(kl.sum(), logits, retain_graph=True)
    (dense_grad,) = torch.autograd.grad(dense.sum(), logits)
    torch.testing.assert_close(grad, dense_grad, rtol=1e-4, atol=1e-5)


def test_topk_kl_by_hand() -> None:
    """Student {a: .5, b: .2, tail: .3}, teacher {a: .4, b: .4, tail: .2}."""
    lp_s, lp_t = torch.tensor([[[0.5, 0.2]]]).log(), torch.tensor([[[0.4, 0.4]]]).log()
    kl = topk_reverse_kl(lp_s, lp_t, torch.ones(1, 1, 2, dtype=torch.bool))
    want = 0.5 * math.log(0.5 / 0.4) + 0.2 * math.log(0.2 / 0.4) + 0.3 * math.log(0.3 / 0.2)
    assert kl.item() == pytest.approx(want, rel=1e-6)


def test_sequence_advantages() -> None:
    rewards = np.array([1.0, 0.0, 0.0, 2.0, 5.0, 1.0, 3.0], dtype=np.float32)
    groups = np.array([7, 7, 7, 3, 3, 9, 9])  # group 7: [1, 0, 0]; 3: [2, 5]; 9: [1, 3]
    grpo = sequence_advantages(rewards, groups, make_cfg(advantage="grpo"))
    std7, std3, std9 = np.std([1, 0, 0], ddof=1), np.std([2, 5], ddof=1), np.std([1, 3], ddof=1)
    want = [2 / 3 / std7, -1 / 3 / std7, -1 / 3 / std7, -1.5 / std3, 1.5 / std3, -1 / std9, 1 / std9]
    assert grpo.dtype == torch.float32 and grpo.shape == (7,)
    torch.testing.assert_close(grpo, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-5)
    centred = sequence_advantages(torch.tensor(rewards), torch.tensor(groups),
                                  make_cfg(advantage="grpo", grpo_std_norm=False))
    torch.testing.assert_close(centred, torch.tensor([2 / 3, -1 / 3, -1 / 3, -1.5, 1.5, -1.0, 1.0]))
    single = sequence_advantages(np.array([4.0, 1.0]), np.array([0, 1]), make_cfg(advantage="grpo"))
    assert single.tolist() == [0.0, 0.0]  # a group of one has no baseline to beat
    batch = sequence_advantages(rewards, groups, make_cfg(advantage="reinforce_pp"))
    torch.testing.assert_close(batch, torch.tensor((rewards - rewards.mean()) / (np.std(rewards, ddof=1) + 1e-6)))
    lengths = np.array([1, 2, 3, 1, 1, 4, 2])
    tokens = np.repeat(rewards.astype(np.float64), lengths)  # the reward broadcast to every token
    want = (rewards - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)
    by_token = sequence_advantages(rewards, groups, make_cfg(advantage="reinforce_pp_token"), response_lengths=lengths)
    torch.testing.assert_close(by_token, torch.tensor(want, dtype=torch.float32))
    with pytest.raises(ValueError, match="needs response_lengths"):
        sequence_advantages(rewards, groups, make_cfg(advantage="reinforce_pp_token"))
    assert sequence_advantages(rewards, groups, make_cfg()).tolist() == [0.0] * 7
    assert sequence_advantages(np.array([math.nan]), np.array([0]), make_cfg()).tolist() == [0.0]
    with pytest.raises(ValueError, match="task.reward"):
        sequence_advantages(np.array([1.0, math.nan]), np.array([0, 0]), make_cfg(advantage="grpo"))
    with pytest.raises(ValueError, match="differ in length"):
        sequence_advantages(rewards, groups[:3], make_cfg(advantage="grpo"))


def test_missing_inputs_and_bad_normalisers_are_explained() -> None:
    full = make_inputs(0)
    plain = LossInputs(lp=full.lp, lp_old=full.lp_old, lp_behaviour=full.lp_behaviour, lp_teacher=full.lp_teacher,
                       mask=full.mask)
    cases = [
        (make_cfg(advantage="grpo", entropy_coef=0.0), "adv_base", {}),
        (make_cfg(kl_loss="topk", entropy_coef=0.0), "topk_lp", {}),
        (make_cfg(kl_loss="full", entropy_coef=0.0), "full_kl", {}),
        (make_cfg(entropy_coef=0.1), "entropy", {}),
        (make_cfg(entropy_coef=0.0), "global_num_tokens=0", {"global_num_tokens": 0}),
        (make_cfg(entropy_coef=0.0, aggregation="seq-mean-token-sum"), "global_num_seqs=0",
         {"global_num_seqs": 0}),
    ]
    for cfg, message, counts in cases:
        with pytest.raises(ValueError, match=message):
            compute_loss(plain, cfg, **{"global_num_tokens": 10, **counts})
    out = compute_loss(plain, make_cfg(entropy_coef=0.0), global_num_tokens=10)
    assert out.metrics["learner/entropy"].item() == 0.0
