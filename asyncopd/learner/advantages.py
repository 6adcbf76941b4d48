"""Sequence-level pieces of the advantages: rewards normalised over groups or the
batch, and discounted sums of per-token signals.

:func:`sequence_advantages` runs once per step over the *whole* batch (groups may
span micro-batches and learner ranks); :mod:`asyncopd.learner.loss` broadcasts
its result over each sequence's tokens and adds the OPD term, whose optional
discount over future tokens is :func:`discounted_sum`. Pure tensor functions; no
models, devices or torch.distributed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from asyncopd.config import LossConfig

__all__ = ["sequence_advantages", "discounted_sum"]

# Added to standard deviations before dividing (GRPO / REINFORCE++ normalisation).
_STD_EPS = 1e-6
# Added to the token variance before the square root (verl's masked_whiten).
_TOKEN_WHITEN_EPS = 1e-8
# Positions per block of the discounted sum (memory [batch, block, block]).
_DISCOUNT_BLOCK = 128


def sequence_advantages(rewards: np.ndarray | Tensor, group_ids: np.ndarray | Tensor,
                        cfg: LossConfig, response_lengths: np.ndarray | Tensor | None = None) -> Tensor:
    """Per-sequence base advantage A_base, float32 [N], from rewards [N] and group ids [N].

    "grpo": ``(R - mean_group) / (std_group + 1e-6)`` (unbiased std, as verl and TRL),
    or ``R - mean_group`` without ``grpo_std_norm``; a group of one gets 0.
    "reinforce_pp": ``(R - mean_batch) / (std_batch + 1e-6)`` over sequences.
    "reinforce_pp_token" (verl's reinforce_plus_plus with gamma = 1): R broadcast over
    each sequence's ``response_lengths`` [N] tokens and whitened over all of them,
    ``(R - m) / sqrt(v + 1e-8)`` with ``m`` the token-weighted mean and ``v`` the
    token-weighted variance times n/(n-1), n the batch's response tokens; every token
    of a sequence gets the same value, so it stays a per-sequence advantage. "opd": zeros.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)  # [N]
    group_ids = torch.as_tensor(group_ids).reshape(-1)  # [N]
    if rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} differ in length")
    if cfg.advantage == "opd" or rewards.numel() == 0:
        return torch.zeros(rewards.shape, dtype=torch.float32)
    if not torch.isfinite(rewards).all():
        raise ValueError(f"loss.advantage={cfg.advantage!r} needs a finite reward per sample, got NaN/inf "
                         "(task.reward='none' gives none); choose a reward in task.reward or use loss.advantage=opd")
    if cfg.advantage == "reinforce_pp":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        return ((rewards - rewards.mean()) / (std + _STD_EPS)).float()
    if cfg.advantage == "reinforce_pp_token":
        return _token_whitened(rewards, response_lengths)
    if cfg.advantage != "grpo":
        raise ValueError(f"loss.advantage={cfg.advantage!r} is unknown; use opd, grpo, reinforce_pp or "
                         "reinforce_pp_token")
    _, group = torch.unique(group_ids, return_inverse=True)  # [N] dense group index
    counts = torch.bincount(group).to(rewards.dtype)  # [G]
    means = torch.zeros_like(counts).index_add_(0, group, rewards) / counts
    centred = rewards - means[group]  # [N]
    if not cfg.grpo_std_norm:
        return centred.float()
    variances = torch.zeros_like(counts).index_add_(0, group, centred**2) / (counts - 1).clamp(min=1)
    return (centred / (variances.sqrt()[group] + _STD_EPS)).float()


def _token_whitened(rewards: Tensor, response_lengths: np.ndarray | Tensor | None) -> Tensor:
    """Rewards [N] whitened over the tokens they are broadcast to (weights = lengths)."""
    if response_lengths is None:
        raise ValueError("loss.advantage='reinforce_pp_token' whitens over tokens and needs response_lengths")
    lengths = torch.as_tensor(response_lengths, dtype=torch.float64).reshape(-1)  # [N]
    if lengths.shape != rewards.shape:
        raise ValueError(f"response_lengths {tuple(lengths.shape)} and rewards {tuple(rewards.shape)} differ in length")
    n = lengths.sum()
    if n < 2:
        return torch.zeros(rewards.shape, dtype=torch.float32)
    mean = (lengths * rewards).sum() / n
    var = (lengths * (rewards - mean) ** 2).sum() / n * n / (n - 1)
    return ((rewards - mean) / torch.sqrt(var + _TOKEN_WHITEN_EPS)).float()


def discounted_sum(values: Tensor, mask: Tensor, discount: float) -> Tensor:
    """``out[b, t] = sum_{s >= t, mask[b, s]} discount^(n_b(t, s)) * values[b, s]`` on
    response positions (0 elsewhere), where ``n_b(t, s)`` counts row b's response
    tokens in ``(t, s]``. discount 0 returns ``values`` on the mask. [B, T] -> [B, T].

    Blocked over positions (exact, no per-position Python loop): within a block a
    [B, block, block] matrix of powers discount^n, n >= 0; across blocks a carried
    sum. Every power is <= 1, so none overflows however long the response.
    """
    values = torch.where(mask, values, torch.zeros_like(values))
    if discount == 0.0 or values.shape[-1] == 0:
        return values
    log_discount = math.log(discount)  # <= 0
    batch, seq = values.shape
    index = mask.cumsum(-1).to(values.dtype)  # [B, T]: response tokens up to and including t
    out = torch.zeros_like(values)
    carry = values.new_zeros(batch, 1)  # sum from the first response token after the block on
    for start in range(((seq - 1) // _DISCOUNT_BLOCK) * _DISCOUNT_BLOCK, -1, -_DISCOUNT_BLOCK):
        end = min(start + _DISCOUNT_BLOCK, seq)
        idx, vals, keep = index[:, start:end], values[:, start:end], mask[:, start:end]  # [B, n]
        before = index[:, start - 1:start] if start > 0 else torch.zeros_like(carry)  # [B, 1]
        after = idx[:, -1:] + 1  # [B, 1]: token index of the carry's first token
        steps = (idx.unsqueeze(1) - idx.unsqueeze(2)).clamp(min=0)  # [B, t, s]: n(t, s) for s >= t
        later = torch.ones(end - start, end - start, dtype=torch.bool, device=mask.device).triu()
        powers = torch.where(later & keep.unsqueeze(1), torch.exp(steps * log_discount), 0.0)
        out[:, start:end] = (powers @ vals.unsqueeze(-1)).squeeze(-1) + torch.exp((after - idx) * log_discount) * carry
        first = torch.where(keep, torch.exp((idx - before - 1).clamp(min=0) * log_discount), 0.0)  # [B, n]
        carry = (first * vals).sum(-1, keepdim=True) + torch.exp((after - before - 1) * log_discount) * carry
    return torch.where(mask, out, torch.zeros_like(out))
