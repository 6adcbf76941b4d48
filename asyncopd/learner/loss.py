"""The per-token objective of the learner: pure tensor functions.

Every function here takes ``[batch, seq]`` tensors already aligned so that
position ``t`` holds the log-prob of the token at ``t + 1`` (see
:mod:`asyncopd.learner.batching`), plus a boolean ``mask`` that is True exactly on
response tokens. Padding may hold any value, including ``inf``/``nan`` in the
caller's log-prob arrays: masked-out positions never reach the loss or a metric.

Naming (DESIGN.md, "The loss"):

- ``lp``           student log-prob now, carries the gradient;
- ``lp_old``       student log-prob at the start of the step (no grad);
- ``lp_behaviour`` the actor's sampling log-prob;
- ``lp_teacher``   the teacher's log-prob of the same token.

:func:`compute_loss` composes the pieces from a :class:`LossConfig`; the three
building blocks (:func:`opd_advantages`, :func:`importance_weights`,
:func:`policy_gradient_loss`) are public so that later objectives (GRPO, k1-k3 KL,
top-k KL, PPO clip, other aggregations) are new entries in the small dispatch
tables below rather than rewrites.

This module knows nothing about models, micro-batches, devices or
torch.distributed; :mod:`asyncopd.learner.train` sums its outputs over
micro-batches and ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from asyncopd.config import LossConfig

__all__ = [
    "LossInputs",
    "LossOutput",
    "opd_advantages",
    "importance_weights",
    "policy_gradient_loss",
    "compute_loss",
]

# exp() of a larger log-ratio is treated as this; far above any sensible TIS cap,
# it only keeps metrics finite when a behaviour log-prob is -inf.
_MAX_LOG_RATIO = 20.0


@dataclass(frozen=True, slots=True)
class LossInputs:
    """Per-token tensors of one micro-batch, all ``[batch, seq]`` and aligned."""

    lp: Tensor
    """float32 [B, T]: student log-probs now (requires grad)."""
    lp_old: Tensor
    """float32 [B, T]: student log-probs at the start of the step (no grad)."""
    lp_behaviour: Tensor
    """float32 [B, T]: the actors' sampling log-probs."""
    lp_teacher: Tensor
    """float32 [B, T]: the teacher's log-probs."""
    mask: Tensor
    """bool [B, T]: True on response tokens."""


@dataclass(frozen=True, slots=True)
class LossOutput:
    """The loss contribution of one micro-batch and its token-mean metrics."""

    loss: Tensor
    """Scalar: this micro-batch's share of the global loss (sum over micro-batches and
    ranks gives the global loss); differentiable."""
    metrics: dict[str, Tensor]
    """Detached scalars, each the mean over this micro-batch's masked tokens."""
    num_tokens: int
    """Masked (response) tokens in this micro-batch: the weight of its metrics."""


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` [B, T] where ``mask``; 0 when the mask is empty."""
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def opd_advantages(lp_teacher: Tensor, lp_old: Tensor, coef: float) -> Tensor:
    """OPD advantage ``coef * (lp_teacher - lp_old)``, [B, T], no grad.

    It is the negative per-token reverse KL estimate, recomputed at learner time
    against the current student (``lp_old``), not the behaviour policy.
    """
    return (coef * (lp_teacher - lp_old)).detach()  # [B, T]


def importance_weights(lp_old: Tensor, lp_behaviour: Tensor, mode: str, cap: float,
                       mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token importance weights correcting behaviour -> learner, no grad.

    ``mode="tis"``: truncated IS, ``min(exp(lp_old - lp_behaviour), cap)``;
    ``mode="none"``: all ones. Returns ``(weights [B, T], clipped [B, T] bool)``
    where ``clipped`` marks tokens whose raw ratio exceeded ``cap`` (always False
    for ``none``). Where ``mask`` is given, padding gets weight 0 and clipped False.
    """
    with torch.no_grad():
        if mode == "tis":
            ratio = torch.exp((lp_old - lp_behaviour).clamp(max=_MAX_LOG_RATIO))  # [B, T]
            clipped = ratio > cap
            weights = ratio.clamp(max=cap)
        elif mode == "none":
            weights = torch.ones_like(lp_old)
            clipped = torch.zeros_like(lp_old, dtype=torch.bool)
        else:
            raise ValueError(f"importance correction {mode!r} is unknown; use 'tis' or 'none' "
                             "(loss.importance_correction)")
        if mask is not None:
            weights = torch.where(mask, weights, torch.zeros_like(weights))
            clipped = clipped & mask
    return weights, clipped


def _token_mean(per_token: Tensor, mask: Tensor, global_num_tokens: int) -> Tensor:
    """Sum over masked tokens / the global token count (data-parallel exact mean)."""
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum() / global_num_tokens


# aggregation name -> (per-token loss [B, T], mask [B, T], global token count) -> scalar.
# seq-mean-token-mean / seq-mean-token-sum need a global sequence count: extend the
# normaliser argument when they are added.
_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "token-mean": _token_mean,
}


def policy_gradient_loss(lp: Tensor, lp_old: Tensor, advantages: Tensor, weights: Tensor, mask: Tensor,
                         *, aggregation: str = "token-mean",
                         global_num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance-weighted policy-gradient loss of one micro-batch.

    Per token: ``-weights * advantages * exp(lp - lp_old)``; the ratio equals 1 at
    ``lp == lp_old`` but carries the gradient of ``lp``, so the gradient is
    ``-weights * advantages * grad(lp)``. ``global_num_tokens`` is the number of
    masked tokens over *all* micro-batches and data-parallel ranks, so summing
    the returned values over them gives the exact global token mean.

    Returns ``(loss_contribution, metrics)``; metrics are detached means over this
    micro-batch's masked tokens (``learner/adv_mean``).
    """
    if global_num_tokens <= 0:
        raise ValueError(f"global_num_tokens={global_num_tokens}: a step needs at least one response "
                         "token; skip empty batches before calling the loss")
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"loss aggregation {aggregation!r} is unknown; choose one of "
                         f"{sorted(_AGGREGATIONS)} (loss.aggregation)")
    # Masked-out positions may hold garbage: keep them out of exp() entirely.
    log_ratio = torch.where(mask, lp - lp_old.detach(), torch.zeros_like(lp))  # [B, T]
    per_token = -weights * advantages * torch.exp(log_ratio)  # [B, T]
    loss = _AGGREGATIONS[aggregation](per_token, mask, global_num_tokens)
    metrics = {"learner/adv_mean": _masked_mean(advantages.detach(), mask)}
    return loss, metrics


def compute_loss(inputs: LossInputs, cfg: LossConfig, *, global_num_tokens: int) -> LossOutput:
    """The configured objective on one micro-batch: OPD advantages, importance
    correction, policy-gradient loss, and the ``learner/*`` token-mean metrics
    ``rkl`` (mean of ``lp_old - lp_teacher``), ``is_clip_frac``,
    ``is_ratio_mean`` (the raw, untruncated ratio) and ``adv_mean``."""
    mask = inputs.mask
    lp_old = inputs.lp_old.detach()
    # Replace the caller's padding (any value, even inf/nan) by lp_old: neutral and finite.
    lp_teacher = torch.where(mask, inputs.lp_teacher, lp_old)
    lp_behaviour = torch.where(mask, inputs.lp_behaviour, lp_old)
    advantages = opd_advantages(lp_teacher, lp_old, cfg.opd_coef)  # [B, T]
    weights, clipped = importance_weights(lp_old, lp_behaviour, cfg.importance_correction, cfg.tis_cap,
                                          mask)
    loss, metrics = policy_gradient_loss(inputs.lp, lp_old, advantages, weights, mask,
                                         aggregation=cfg.aggregation,
                                         global_num_tokens=global_num_tokens)
    with torch.no_grad():
        raw_ratio = torch.exp((lp_old - lp_behaviour).clamp(max=_MAX_LOG_RATIO))  # [B, T]
        metrics["learner/rkl"] = _masked_mean(lp_old - lp_teacher, mask)
        metrics["learner/is_clip_frac"] = _masked_mean(clipped.float(), mask)
        metrics["learner/is_ratio_mean"] = _masked_mean(raw_ratio, mask)
    return LossOutput(loss=loss, metrics=metrics, num_tokens=int(mask.sum()))
