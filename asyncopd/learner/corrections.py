"""Behaviour -> learner importance corrections (``loss.importance_correction``): pure
tensor functions.

The actors sample with slightly stale weights, so each response token carries the
behaviour log-prob it was sampled with; the learner's log-prob at the start of the
step (``lp_old``) differs from it. :func:`importance_weights` turns the log ratio
``lp_old - lp_behaviour`` into the per-token weight ``w_t`` of the policy-gradient
term (:mod:`asyncopd.learner.loss`): truncated IS per token (``tis``) or per
sequence (``seq_tis``), a hard band (``mask``, tokens outside it dropped), the
decoupled PPO objective's behaviour weight (``decoupled_ppo``), or none.

This module knows nothing about advantages, KL terms, aggregation or models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from asyncopd.config import LossConfig

__all__ = ["MAX_LOG_RATIO", "ImportanceWeights", "importance_weights"]

MAX_LOG_RATIO = 20.0
"""exp() of a larger log-ratio is treated as this (verl clamps the same way): far above
any sensible cap, it keeps ratios and k3 finite when a log-prob is extreme or -inf."""


@dataclass(frozen=True, slots=True)
class ImportanceWeights:
    """Behaviour -> learner correction of one micro-batch, all [B, T], no grad, and
    False / 0 on padding."""

    weights: Tensor
    """float [B, T]: w_t multiplying the policy-gradient term."""
    ratio: Tensor
    """float [B, T]: the raw token ratio exp(lp_old - lp_behaviour) (log clamped at 20)."""
    capped: Tensor
    """bool [B, T]: the weight was truncated at tis_cap."""
    dropped: Tensor
    """bool [B, T]: the token was dropped by the masked-IS band."""


def _exp_ratio(log_ratio: Tensor) -> Tensor:
    return torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO))


def _truncated(ratio: Tensor, cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor]:
    return ratio.clamp(max=cfg.tis_cap), ratio > cfg.tis_cap, torch.zeros_like(ratio, dtype=torch.bool)


def _token_tis(log_ratio: Tensor, mask: Tensor, cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor]:
    return _truncated(_exp_ratio(log_ratio), cfg)


def _sequence_tis(log_ratio: Tensor, mask: Tensor, cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor]:
    sequence = torch.where(mask, log_ratio, 0.0).sum(-1, keepdim=True)  # [B, 1]
    return _truncated(_exp_ratio(sequence).expand_as(log_ratio), cfg)


def _masked_is(log_ratio: Tensor, mask: Tensor, cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor]:
    ratio = _exp_ratio(log_ratio)
    kept = (ratio >= cfg.is_mask_low) & (ratio <= cfg.is_mask_high)
    return kept.to(ratio.dtype), torch.zeros_like(kept), ~kept


def _no_correction(log_ratio: Tensor, mask: Tensor, cfg: LossConfig) -> tuple[Tensor, Tensor, Tensor]:
    never = torch.zeros_like(log_ratio, dtype=torch.bool)
    return torch.ones_like(log_ratio), never, never


# loss.importance_correction -> (log ratio lp_old - lp_behaviour, mask, cfg) -> (weights, capped, dropped).
# decoupled_ppo's behaviour weight is the token TIS weight; its PPO clip is applied by
# policy_gradient_per_token, which config validation makes mandatory for it.
_CORRECTIONS: dict[str, Callable[[Tensor, Tensor, LossConfig], tuple[Tensor, Tensor, Tensor]]] = {
    "tis": _token_tis,
    "seq_tis": _sequence_tis,
    "mask": _masked_is,
    "decoupled_ppo": _token_tis,
    "none": _no_correction,
}


def importance_weights(lp_old: Tensor, lp_behaviour: Tensor, mask: Tensor, cfg: LossConfig) -> ImportanceWeights:
    """The configured behaviour -> learner correction (``loss.importance_correction``)
    from finite [B, T] log-probs; no grad; padding gets weight 0."""
    if cfg.importance_correction not in _CORRECTIONS:
        raise ValueError(f"loss.importance_correction={cfg.importance_correction!r} is unknown; choose one of "
                         f"{sorted(_CORRECTIONS)}")
    with torch.no_grad():
        log_ratio = torch.where(mask, lp_old - lp_behaviour, 0.0)  # [B, T]
        weights, capped, dropped = _CORRECTIONS[cfg.importance_correction](log_ratio, mask, cfg)
        return ImportanceWeights(weights=torch.where(mask, weights, 0.0), ratio=_exp_ratio(log_ratio),
                                 capped=capped & mask, dropped=dropped & mask)
