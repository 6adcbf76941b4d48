"""The per-token objective of the learner: pure tensor functions.

Every function here takes ``[batch, seq]`` tensors already aligned so that
position ``t`` holds the log-prob of the token at ``t + 1`` (see
:mod:`asyncopd.learner.batching`), plus a boolean ``mask`` that is True exactly on
response tokens. Padding may hold any value, including ``inf``/``nan``: the first
thing :func:`compute_loss` does is replace it with finite, neutral values
(``torch.where``, never a multiplication by the mask), so padding reaches no loss,
metric or gradient.

Naming (DESIGN.md, "The loss"):

- ``lp``           student log-prob now, carries the gradient;
- ``lp_old``       student log-prob at the start of the step (no grad);
- ``lp_behaviour`` the actor's sampling log-prob;
- ``lp_teacher``   the teacher's log-prob of the same token;
- ``r_t = lp_teacher - lp_old`` the OPD signal (the negative reverse-KL estimate).

The objective (:class:`~asyncopd.config.LossConfig`) is
``pg_coef * L_pg + kl_loss_coef * L_kl - entropy_coef * H``, each term one
aggregation (token or sequence mean, with *global* normalisers) of a per-token
quantity:

- ``L_pg``: ``-w_t * min(rho_t * A_t, clip(rho_t) * A_t)``, ``rho_t = exp(lp - lp_old)``
  (no clip when ``ppo_clip_*`` are None; capped at ``-w_t * c * A_t`` for ``A_t < 0``
  with the dual clip ``ppo_clip_dual = c``), ``A_t`` from ``_ADVANTAGES``, ``w_t`` from
  :mod:`asyncopd.learner.corrections`;
- ``L_kl``: a sampled-token estimator, the top-k reverse KL, or the exact reverse KL
  over the full vocabulary computed by the learner's vocabulary pass against an
  in-process teacher (``full_kl``; see :mod:`asyncopd.learner.full_kl`) (``_KL_LOSSES``);
- ``H``: the student's entropy per position (an input).

Each option is one entry of a small dispatch table; every combination is
checked against a per-token Python reference in ``tests/unit/test_loss.py``.

This module knows nothing about models, micro-batches, devices or
torch.distributed; :mod:`asyncopd.learner.train` sums its outputs over
micro-batches and ranks (and passes the global token and sequence counts).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from asyncopd.config import LossConfig
from asyncopd.learner.advantages import discounted_sum
from asyncopd.learner.corrections import MAX_LOG_RATIO as _MAX_LOG_RATIO
from asyncopd.learner.corrections import ImportanceWeights, importance_weights

__all__ = [
    "LossInputs",
    "LossOutput",
    "token_advantages",
    "policy_gradient_per_token",
    "kl_per_token",
    "topk_reverse_kl",
    "aggregation_weights",
    "compute_loss",
]

# Smallest tail mass of the top-k KL's tail bucket. The student's top-k log-probs come
# from a float32 log-softmax whose absolute error is ~1e-6 for logits of order 10, so
# 1 - sum(p) below this is noise; both tails are clamped alike, so two negligible
# tails contribute nothing rather than a spurious log-ratio gradient.
_TAIL_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class LossInputs:
    """Per-token tensors of one micro-batch, all ``[batch, seq]`` and aligned;
    padding (``~mask``) may hold anything, including inf/nan."""

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
    adv_base: Tensor | None = None
    """float32 [B, T]: the row's sequence base advantage (:func:`sequence_advantages`)
    on each of its tokens; needed by advantage "grpo" / "reinforce_pp" / "reinforce_pp_token"."""
    entropy: Tensor | None = None
    """float32 [B, T]: the student's entropy per position (with grad when
    entropy_coef > 0); None: no entropy bonus, metric 0."""
    topk_lp: Tensor | None = None
    """float32 [B, T, K]: student log-probs of the top-k union ids (with grad);
    any value (e.g. -inf) where not ``topk_valid``."""
    topk_lp_teacher: Tensor | None = None
    """float32 [B, T, K]: teacher log-probs of the same ids; any value where invalid."""
    topk_valid: Tensor | None = None
    """bool [B, T, K]: True where the candidate id exists (K = 2k: teacher top-k, then
    the student's top-k ids the teacher lacks, -1 padded)."""
    full_kl: Tensor | None = None
    """float32 [B, T]: the exact reverse KL over the whole vocabulary at each position
    (with grad through the student), from :func:`asyncopd.learner.full_kl.teacher_chunk_fn`;
    needed by kl_loss "full"."""


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


def _neutral_padding(inputs: LossInputs) -> LossInputs:
    """A copy whose padding holds finite, neutral values: log-probs equal to
    ``lp_old = 0`` (ratios 1, signals 0), entropy and base advantage 0, no valid
    top-k candidate. ``lp`` keeps its graph on response tokens only."""
    mask = inputs.mask
    lp_old = torch.where(mask, inputs.lp_old.detach(), 0.0)

    def on_mask(values: Tensor | None, fill: Tensor | float) -> Tensor | None:
        return None if values is None else torch.where(mask, values, fill)

    valid = None if inputs.topk_valid is None else inputs.topk_valid & mask.unsqueeze(-1)

    def on_valid(values: Tensor | None) -> Tensor | None:
        return None if values is None or valid is None else torch.where(valid, values, 0.0)

    return LossInputs(lp=on_mask(inputs.lp, lp_old), lp_old=lp_old,
                      lp_behaviour=on_mask(inputs.lp_behaviour.detach(), lp_old),
                      lp_teacher=on_mask(inputs.lp_teacher.detach(), lp_old), mask=mask,
                      adv_base=on_mask(inputs.adv_base, 0.0), entropy=on_mask(inputs.entropy, 0.0),
                      topk_lp=on_valid(inputs.topk_lp),
                      topk_lp_teacher=on_valid(None if inputs.topk_lp_teacher is None
                                               else inputs.topk_lp_teacher.detach()),
                      topk_valid=valid, full_kl=on_mask(inputs.full_kl, 0.0))


# --- advantages ------------------------------------------------------------------------

def _opd_signal(x: LossInputs, cfg: LossConfig) -> Tensor:
    return discounted_sum(x.lp_teacher - x.lp_old, x.mask, cfg.discount)  # [B, T]


def _opd_advantage(x: LossInputs, cfg: LossConfig) -> Tensor:
    return cfg.opd_coef * _opd_signal(x, cfg)


def _penalised_base_advantage(x: LossInputs, cfg: LossConfig) -> Tensor:
    if x.adv_base is None:
        raise ValueError(f"loss.advantage={cfg.advantage!r} needs LossInputs.adv_base (the per-sequence "
                         "advantages of sequence_advantages, broadcast over each row's tokens)")
    return x.adv_base + cfg.opd_penalty_coef * _opd_signal(x, cfg)


# loss.advantage -> (neutral-padded inputs, cfg) -> A_t [B, T]
_ADVANTAGES: dict[str, Callable[[LossInputs, LossConfig], Tensor]] = {
    "opd": _opd_advantage,
    "grpo": _penalised_base_advantage,
    "reinforce_pp": _penalised_base_advantage,
    "reinforce_pp_token": _penalised_base_advantage,
}


def token_advantages(x: LossInputs, cfg: LossConfig) -> Tensor:
    """A_t [B, T] of the configured ``loss.advantage`` on neutral-padded inputs, no grad."""
    if cfg.advantage not in _ADVANTAGES:
        raise ValueError(f"loss.advantage={cfg.advantage!r} is unknown; choose one of {sorted(_ADVANTAGES)}")
    with torch.no_grad():
        return _ADVANTAGES[cfg.advantage](x, cfg)


# --- per-token losses -------------------------------------------------------------------

def policy_gradient_per_token(lp: Tensor, lp_old: Tensor, advantages: Tensor, weights: Tensor,
                              clip_low: float | None, clip_high: float | None,
                              clip_dual: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``-w * min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)`` per token, with
    ``rho = exp(lp - lp_old)`` (log clamped at +-20); a None bound is not applied. With
    ``clip_dual = c`` (dual-clip PPO, verl's clip_ratio_c), tokens with ``A < 0`` have
    the unweighted term capped at ``-c * A``.

    At ``lp == lp_old`` the value is ``-w * A`` and the gradient ``-w * A * grad(lp)``.
    Returns ``(loss [B, T], clipped [B, T] bool, dual_clipped [B, T] bool)``: ``clipped``
    marks tokens where the clipped branch is the smaller one, ``dual_clipped`` those held
    at the dual bound; the gradient of both is zero."""
    ratio = torch.exp((lp - lp_old.detach()).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # [B, T]
    surrogate = ratio * advantages
    clipped = torch.zeros_like(surrogate, dtype=torch.bool)
    if clip_low is not None or clip_high is not None:
        clipped_surrogate = ratio.clamp(None if clip_low is None else 1.0 - clip_low,
                                        None if clip_high is None else 1.0 + clip_high) * advantages
        clipped = clipped_surrogate < surrogate
        # where() rather than minimum(): no gradient split at ties, none through the other branch.
        surrogate = torch.where(clipped, clipped_surrogate, surrogate)
    per_token = -surrogate  # [B, T]
    dual_clipped = torch.zeros_like(clipped)
    if clip_dual is not None:
        bound = -clip_dual * advantages.detach()  # [B, T], no gradient
        dual_clipped = (advantages < 0) & (per_token > bound)
        per_token = torch.where(dual_clipped, bound, per_token)
    return weights * per_token, clipped, dual_clipped


def topk_reverse_kl(topk_lp: Tensor, topk_lp_teacher: Tensor, topk_valid: Tensor) -> Tensor:
    """Exact reverse KL(student || teacher) over the candidate ids plus one tail bucket
    for all other ids, per position: [B, T, K] x3 -> [B, T].

    ``sum_i p_s(i) (lp_s(i) - lp_t(i)) + p_s(tail) (log p_s(tail) - log p_t(tail))`` with
    ``p(tail) = max(1 - sum_i p(i), 0)`` (its log clamped at 1e-6). Computed in float64;
    the gradient flows through the student's log-probs only."""
    lp_s = torch.where(topk_valid, topk_lp, 0.0).double()  # [B, T, K]
    lp_t = torch.where(topk_valid, topk_lp_teacher.detach(), 0.0).double()
    p_s = torch.where(topk_valid, lp_s.exp(), 0.0)
    p_t = torch.where(topk_valid, lp_t.exp(), 0.0)
    head = (p_s * (lp_s - lp_t)).sum(-1)  # [B, T]
    tail_s, tail_t = 1.0 - p_s.sum(-1), 1.0 - p_t.sum(-1)
    tail = tail_s.clamp(min=0.0) * (tail_s.clamp(min=_TAIL_EPS).log() - tail_t.clamp(min=_TAIL_EPS).log())
    return (head + tail).to(topk_lp.dtype)


def _k1(x: LossInputs) -> Tensor:
    return x.lp - x.lp_teacher


def _k2(x: LossInputs) -> Tensor:
    return 0.5 * (x.lp - x.lp_teacher) ** 2


def _k3(x: LossInputs) -> Tensor:
    log_ratio = (x.lp_teacher - x.lp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    return torch.exp(log_ratio) - log_ratio - 1.0


def _topk(x: LossInputs) -> Tensor:
    if x.topk_lp is None or x.topk_lp_teacher is None or x.topk_valid is None:
        raise ValueError("loss.kl_loss='topk' needs LossInputs.topk_lp, topk_lp_teacher and topk_valid "
                         "(teacher.top_k > 0)")
    return topk_reverse_kl(x.topk_lp, x.topk_lp_teacher, x.topk_valid)


def _full(x: LossInputs) -> Tensor:
    if x.full_kl is None:
        raise ValueError("loss.kl_loss='full' needs LossInputs.full_kl (an in-process teacher: "
                         "teacher.backend=colocated)")
    return x.full_kl


# loss.kl_loss -> (neutral-padded inputs) -> per-token KL [B, T] with grad through the student.
_KL_LOSSES: dict[str, Callable[[LossInputs], Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3, "topk": _topk,
                                                          "full": _full}


def kl_per_token(x: LossInputs, cfg: LossConfig) -> Tensor | None:
    """The configured direct KL loss per token on neutral-padded inputs (k3 clamped to
    ``[-kl_clamp, kl_clamp]`` when set, as verl's low_var_kl; k1, k2 and topk never),
    [B, T]; None for ``kl_loss="none"``."""
    if cfg.kl_loss == "none":
        return None
    if cfg.kl_loss not in _KL_LOSSES:
        raise ValueError(f"loss.kl_loss={cfg.kl_loss!r} is unknown; choose none or one of {sorted(_KL_LOSSES)}")
    kl = _KL_LOSSES[cfg.kl_loss](x)
    if cfg.kl_clamp is not None and cfg.kl_loss == "k3":
        kl = kl.clamp(-cfg.kl_clamp, cfg.kl_clamp)
    return kl


# --- aggregation ------------------------------------------------------------------------

def _per_token_mean(mask: Tensor, num_tokens: int, num_seqs: int) -> Tensor:
    return mask / num_tokens


def _per_sequence_token_mean(mask: Tensor, num_tokens: int, num_seqs: int) -> Tensor:
    return mask / (mask.sum(-1, keepdim=True).clamp(min=1) * num_seqs)


def _per_sequence_token_sum(mask: Tensor, num_tokens: int, num_seqs: int) -> Tensor:
    return mask / num_seqs


# loss.aggregation -> (mask, global tokens, global sequences) -> weight of each token [B, T].
# The aggregations are linear, so each is a fixed weight per token; a sequence never
# spans micro-batches, so its own token count is local.
_AGGREGATIONS: dict[str, Callable[[Tensor, int, int], Tensor]] = {
    "token-mean": _per_token_mean,
    "seq-mean-token-mean": _per_sequence_token_mean,
    "seq-mean-token-sum": _per_sequence_token_sum,
}


def aggregation_weights(mask: Tensor, aggregation: str, *, global_num_tokens: int,
                        global_num_seqs: int | None = None) -> Tensor:
    """float32 [B, T] weights whose sum against a per-token loss is this micro-batch's
    share of the global aggregate: ``1/N_tokens`` (token-mean), ``1/(N_seqs * n_b)``
    (seq-mean-token-mean), ``1/N_seqs`` (seq-mean-token-sum) on the mask, 0 elsewhere.
    ``global_num_seqs`` None: this micro-batch's rows with a response token (exact only
    when it is the whole batch)."""
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"loss.aggregation={aggregation!r} is unknown; choose one of {sorted(_AGGREGATIONS)}")
    if global_num_tokens <= 0:
        raise ValueError(f"global_num_tokens={global_num_tokens}: a step needs at least one response "
                         "token; skip empty batches before calling the loss")
    if global_num_seqs is None:
        global_num_seqs = int(mask.any(-1).sum())
    if aggregation != "token-mean" and global_num_seqs <= 0:
        raise ValueError(f"global_num_seqs={global_num_seqs}: {aggregation} needs at least one sequence with "
                         "a response token")
    return _AGGREGATIONS[aggregation](mask.float(), global_num_tokens, global_num_seqs)


# --- the objective ----------------------------------------------------------------------

def _metrics(x: LossInputs, advantages: Tensor, correction: ImportanceWeights, ppo_clipped: Tensor,
             dual_clipped: Tensor, pg: Tensor, kl: Tensor | None) -> dict[str, Tensor]:
    mask = x.mask
    with torch.no_grad():
        signal = x.lp_teacher - x.lp_old
        log_ratio = signal.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        adv_mean, adv_sq_mean = _masked_mean(advantages, mask), _masked_mean(advantages**2, mask)
        metrics = {
            "learner/pg_loss": _masked_mean(pg.detach(), mask),
            "learner/kl_loss": _masked_mean(kl.detach(), mask) if kl is not None else pg.new_zeros(()),
            "learner/rkl": _masked_mean(-signal, mask),
            "learner/kl_k3": _masked_mean(torch.exp(log_ratio) - log_ratio - 1.0, mask),
            "learner/is_ratio_mean": _masked_mean(correction.ratio, mask),
            "learner/is_clip_frac": _masked_mean(correction.capped.float(), mask),
            "learner/is_mask_frac": _masked_mean(correction.dropped.float(), mask),
            "learner/ppo_clip_frac": _masked_mean(ppo_clipped.float(), mask),
            "learner/ppo_dual_clip_frac": _masked_mean(dual_clipped.float(), mask),
            "learner/entropy": (_masked_mean(x.entropy.detach(), mask) if x.entropy is not None
                                else pg.new_zeros(())),
            "learner/adv_mean": adv_mean,
            "learner/adv_sq_mean": adv_sq_mean,
            "learner/adv_std": (adv_sq_mean - adv_mean**2).clamp(min=0.0).sqrt(),
        }
    return {key: value.float() for key, value in metrics.items()}


def compute_loss(inputs: LossInputs, cfg: LossConfig, *, global_num_tokens: int,
                 global_num_seqs: int | None = None) -> LossOutput:
    """The configured objective on one micro-batch:
    ``pg_coef * L_pg + kl_loss_coef * L_kl - entropy_coef * H``, aggregated by
    ``cfg.aggregation``.

    ``global_num_tokens`` / ``global_num_seqs``: response tokens / sequences with at
    least one response token over *all* micro-batches and data-parallel ranks of the
    update, so that summing the returned losses gives the exact global aggregate.
    ``global_num_seqs`` None counts this micro-batch's sequences (exact only when it
    is the whole batch; token-mean does not use it).

    Metrics (detached means over this micro-batch's masked tokens): ``learner/``
    ``pg_loss``, ``kl_loss`` (0 without), ``rkl`` (lp_old - lp_teacher), ``kl_k3``,
    ``is_ratio_mean`` (raw token ratio), ``is_clip_frac`` (weight capped),
    ``is_mask_frac`` (dropped by masked IS), ``ppo_clip_frac``, ``ppo_dual_clip_frac``, ``entropy`` (0 without),
    ``adv_mean``, ``adv_sq_mean``, ``adv_std`` (this micro-batch's). (The top-k
    overlap is a batch metric of the learner: see ``batching.topk_overlap``.)
    """
    if cfg.kl_loss == "auto" or cfg.pg_coef is None:
        raise ValueError(f"loss.kl_loss={cfg.kl_loss!r}, loss.pg_coef={cfg.pg_coef!r}: unresolved; JobConfig decides "
                         "them from the teacher's placement. Fix: build the LossConfig through JobConfig, or give "
                         "loss.kl_loss and loss.pg_coef explicitly")
    if cfg.entropy_coef > 0 and inputs.entropy is None:
        raise ValueError(f"loss.entropy_coef={cfg.entropy_coef} needs LossInputs.entropy")
    weights = aggregation_weights(inputs.mask, cfg.aggregation, global_num_tokens=global_num_tokens,
                                  global_num_seqs=global_num_seqs)  # [B, T]
    x = _neutral_padding(inputs)
    advantages = token_advantages(x, cfg)  # [B, T]
    correction = importance_weights(x.lp_old, x.lp_behaviour, x.mask, cfg)
    pg, ppo_clipped, dual_clipped = policy_gradient_per_token(x.lp, x.lp_old, advantages, correction.weights,
                                                              cfg.ppo_clip_low, cfg.ppo_clip_high, cfg.ppo_clip_dual)
    kl = kl_per_token(x, cfg)
    per_token = cfg.pg_coef * pg  # [B, T]
    if kl is not None:
        per_token = per_token + cfg.kl_loss_coef * kl
    if cfg.entropy_coef > 0:
        per_token = per_token - cfg.entropy_coef * x.entropy
    loss = torch.where(x.mask, weights * per_token, 0.0).sum()
    metrics = _metrics(x, advantages, correction, ppo_clipped, dual_clipped, pg, kl)
    return LossOutput(loss=loss, metrics=metrics, num_tokens=int(x.mask.sum()))
