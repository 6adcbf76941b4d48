"""One optimiser step of the learner, and its optimiser.

:func:`train_step` is the learner's computational core: for each micro-batch,
recompute the student's log-probs, build the configured loss
(:mod:`asyncopd.learner.loss`), accumulate gradients; then clip, step, zero, and
return metrics that are identical on every learner rank.

Gradient scale. Each micro-batch's loss is its masked token sum divided by the
*global* number of response tokens, so summing gradients over micro-batches and
ranks gives exactly the gradient of the global token mean. FSDP2 *averages*
gradients over the ``dp_size`` ranks in its reduce-scatter; the backward loss is
therefore multiplied by ``dp_size`` (exact for power-of-two sizes, one rounding
otherwise). Reported losses are not scaled.

Collectives. On ``dp_size > 1`` this function all-reduces over the *default*
process group (which must be exactly the learner ranks) to agree on the number
of micro-batches (a rank with fewer runs empty ones, so FSDP's per-pass
collectives match) and to sum metrics. With ``dp_size == 1`` it issues none, so
an unsharded model needs no process group.

This module does not pack batches, publish weights or checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from asyncopd.config import LearnerConfig, LossConfig
from asyncopd.learner.batching import MicroBatch
from asyncopd.learner.loss import LossInputs, compute_loss
from asyncopd.learner.model import model_device, token_logprobs

__all__ = ["make_optimizer", "train_step"]

logger = logging.getLogger(__name__)

# Token-weighted means summed over micro-batches and ranks, then divided by the token count.
_MEAN_METRICS = ("learner/rkl", "learner/is_clip_frac", "learner/is_ratio_mean", "learner/adv_mean")


def make_optimizer(model: nn.Module, cfg: LearnerConfig) -> torch.optim.AdamW:
    """AdamW over the model's (possibly sharded) parameters, from ``learner.*``.

    Build it after :func:`~asyncopd.learner.model.shard_model`, so that it holds
    the sharded DTensor parameters."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.adam_betas),
                             weight_decay=cfg.weight_decay)


def _all_reduce(values: torch.Tensor, op: dist.ReduceOp.RedOpType, dp_size: int) -> torch.Tensor:
    if dp_size > 1:
        dist.all_reduce(values, op=op)
    return values


def _equalise_micro_batches(micro_batches: Sequence[MicroBatch], dp_size: int) -> list[MicroBatch]:
    """Pad this rank's list with empty micro-batches to the ranks' maximum count."""
    count = torch.tensor([len(micro_batches)], dtype=torch.int64)
    target = int(_all_reduce(count, dist.ReduceOp.MAX, dp_size).item())
    return list(micro_batches) + [MicroBatch.empty() for _ in range(target - len(micro_batches))]


def _global_num_tokens(micro_batches: Sequence[MicroBatch], dp_size: int) -> int:
    count = torch.tensor([sum(mb.num_response_tokens for mb in micro_batches)], dtype=torch.int64)
    return int(_all_reduce(count, dist.ReduceOp.SUM, dp_size).item())


def _grad_norm(model: nn.Module, max_norm: float | None) -> float:
    """Clip (when ``max_norm`` is set) and return the global gradient L2 norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[MicroBatch],
               loss_cfg: LossConfig, learner_cfg: LearnerConfig, global_num_tokens: int | None = None,
               dp_size: int = 1) -> dict[str, float]:
    """One optimisation pass over this rank's ``micro_batches``; returns metrics.

    ``global_num_tokens``: response tokens over all micro-batches of all ranks
    (None: computed here with one all-reduce). ``dp_size``: number of learner
    ranks sharing the step (the FSDP mesh size). Every learner rank must call
    this together. The returned metrics (``learner/loss``, ``learner/rkl``,
    ``learner/is_clip_frac``, ``learner/is_ratio_mean``, ``learner/adv_mean``,
    ``learner/grad_norm``, ``learner/num_tokens``) are the same on every rank.
    """
    if dp_size < 1:
        raise ValueError(f"dp_size={dp_size}: must be the number of learner ranks (>= 1)")
    if dp_size > 1 and dist.get_world_size() != dp_size:
        raise RuntimeError(f"dp_size={dp_size} but the default process group has {dist.get_world_size()} "
                           "ranks; train_step reduces over the default group, which must be exactly the "
                           "learner ranks")
    micro_batches = _equalise_micro_batches(micro_batches, dp_size)
    if global_num_tokens is None:
        global_num_tokens = _global_num_tokens(micro_batches, dp_size)
    if global_num_tokens <= 0:
        raise ValueError("the batch has no response tokens on any rank; drop empty batches before train_step")

    device = model_device(model)
    # Per-rank sums: [loss, token-weighted sums of _MEAN_METRICS..., num_tokens].
    sums = torch.zeros(len(_MEAN_METRICS) + 2, dtype=torch.float64)
    for micro_batch in micro_batches:
        micro_batch = micro_batch.to(device)
        lp = token_logprobs(model, micro_batch.input_ids, micro_batch.attention_mask)  # [B, T]
        # One pass per step: the policy at the start of the step is the current one.
        inputs = LossInputs(lp=lp, lp_old=lp.detach(), lp_behaviour=micro_batch.lp_behaviour,
                            lp_teacher=micro_batch.lp_teacher, mask=micro_batch.response_mask)
        out = compute_loss(inputs, loss_cfg, global_num_tokens=global_num_tokens)
        (out.loss * dp_size).backward()  # FSDP averages over ranks; see the module docstring
        sums[0] += out.loss.detach().double().item()
        for i, key in enumerate(_MEAN_METRICS):
            sums[1 + i] += out.metrics[key].double().item() * out.num_tokens
        sums[-1] += out.num_tokens

    grad_norm = _grad_norm(model, learner_cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    sums = _all_reduce(sums, dist.ReduceOp.SUM, dp_size)
    num_tokens = float(sums[-1])
    metrics = {"learner/loss": float(sums[0])}
    for i, key in enumerate(_MEAN_METRICS):
        metrics[key] = float(sums[1 + i]) / max(num_tokens, 1.0)
    metrics["learner/grad_norm"] = grad_norm
    metrics["learner/num_tokens"] = num_tokens
    if not math.isfinite(metrics["learner/loss"]) or not math.isfinite(grad_norm):
        logger.warning("non-finite learner step: loss=%s grad_norm=%s", metrics["learner/loss"], grad_norm)
    return metrics
