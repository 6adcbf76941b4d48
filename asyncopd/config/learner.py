"""``async``, ``buffer``, ``loss`` and ``learner``: staleness, the buffer, the objective, the optimiser.

Part of :mod:`asyncopd.config` (import from there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from asyncopd.config._base import _check_fraction, _check_positive, _fail


@dataclass(kw_only=True, slots=True)
class AsyncConfig:
    """Bounded staleness between the acting and the learning policy."""

    max_staleness: int = 1
    """eta: the learner never trains on a sample whose oldest token was generated more
    than eta optimiser steps ago. 0 = synchronous on-policy, 1 = off-by-one."""
    schedule: Literal["bounded", "fixed_lag"] = "bounded"
    """"bounded": actors run free, take new weights between engine steps (in flight,
    but not while requests of the step the update makes due are running: the learner
    trains that step next) and stop admitting prompts that would exceed eta.
    "fixed_lag": batch k is generated entirely by policy version k-eta (deterministic,
    for ablations)."""

    def __post_init__(self) -> None:
        if self.max_staleness < 0:
            _fail(
                "async.max_staleness", self.max_staleness, "must be >= 0",
                "use 0 for synchronous training or a positive bound such as 1",
            )


@dataclass(kw_only=True, slots=True)
class BufferConfig:
    """The staleness-aware buffer between the teacher pool and the learner."""

    capacity: int | None = None
    """Samples the buffer holds at most. None: batch_size * (max_staleness + 2), enough
    for every batch the actors may run ahead."""


@dataclass(kw_only=True, slots=True)
class LossConfig:
    """The per-token objective (see learner/loss.py):
    ``pg_coef * L_pg + kl_loss_coef * L_kl - entropy_coef * H``."""

    advantage: Literal["opd", "grpo", "reinforce_pp", "reinforce_pp_token"] = "opd"
    """Per-token advantage of the policy-gradient term L_pg. "opd": opd_coef times the
    (discounted) OPD signal r_t = lp_teacher - lp_old; works with one sample per
    prompt. "grpo": the sequence's group-normalised reward (actor.samples_per_prompt
    samples per group) plus opd_penalty_coef times the OPD signal. "reinforce_pp": the
    same with the reward whitened over the batch's *sequences* ((R - mean) / (std +
    1e-6), each sequence counted once). "reinforce_pp_token": verl's
    adv_estimator=reinforce_plus_plus (gamma = 1): the reward broadcast to every response
    token and whitened over the batch's *tokens* ((R - token mean) / sqrt(token var +
    1e-8), so long responses weigh more in the statistics). The OPD penalty is added
    after whitening in both (verl folds a KL-in-reward into the rewards before)."""
    opd_coef: float = 1.0
    """Scale of the OPD advantage (advantage="opd" only), dimensionless."""
    opd_penalty_coef: float = 0.0
    """Scale of the OPD signal added to the reward advantage as a reverse-KL penalty
    (advantage="grpo" / "reinforce_pp*" only); 0 = plain GRPO / REINFORCE++."""
    discount: float = 0.0
    """gamma in [0, 1]: the OPD signal of token t becomes sum_{s>=t} gamma^(s-t) r_s over
    the later response tokens of the same sequence (s-t counted in response tokens).
    0 = each token's own r_t."""
    grpo_std_norm: bool = True
    """GRPO: divide the group-centred reward by the group's standard deviation (+1e-6);
    False = Dr. GRPO style, centring only."""
    kl_loss: Literal["auto", "none", "k1", "k2", "k3", "topk", "full"] = "auto"
    """Direct KL loss L_kl with gradient through the student (KDRL / pure KD). "auto"
    (the default): the exact reverse KL the teacher's placement allows, the objectives
    that learned most per sample on the demo (bench/results/objectives.txt): "full" with
    teacher.backend=colocated, else "topk" (teacher.top_k then defaults to 16), or
    "none" when teacher.top_k=0 is set explicitly; decided once, in JobConfig, so every
    role sees the resolved name. On the
    sampled tokens, with d = lp - lp_teacher: "k1" = d, "k2" = d^2 / 2 (its gradient is
    the reverse KL's), "k3" = exp(-d) + d - 1 (verl low_var_kl; its gradient is the
    forward KL's). "topk": the exact reverse KL over the union of teacher and student
    top-k ids plus one tail bucket (needs teacher.top_k > 0). "full": the exact reverse
    KL sum_v p_s(v) (log p_s(v) - log p_t(v)) over the whole vocabulary at every
    response position (TRL DistillationTrainer / GKD with beta=1), computed chunk by
    chunk in the learner's vocabulary pass (needs teacher.backend=colocated: full
    distributions do not travel). "none": no KL loss.
    k1's expected gradient on on-policy samples is zero: use it as a metric or an
    advantage, rarely as a loss."""
    kl_clamp: float | None = 10.0
    """Clamp of the k3 estimator to [-kl_clamp, kl_clamp] (nats; gradient zero outside),
    as verl's low_var_kl, whose clamp is 10: a token whose teacher log-prob exceeds the
    student's by more than ~2.4 nats stops pushing. k1 and k2 are never clamped (verl
    neither), nor are the exact "topk" and "full". None = k3 unclamped."""
    pg_coef: float | None = None
    """Weight of the policy-gradient term (AReaL rl_weight); 0 = pure distillation
    by kl_loss. None: 0 when a KL loss is on (kl_loss other than "none" with
    kl_loss_coef > 0) and advantage="opd" (pure KD), else 1 (the OPD advantage alone, or
    a reward advantage such as GRPO, with the KL loss beside it: KDRL)."""
    kl_loss_coef: float = 1.0
    """Weight of the direct KL loss (AReaL distill_weight); unused with kl_loss="none"."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus: the loss subtracts entropy_coef times the student's
    aggregated per-token entropy (nats). 0 = off."""
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    """How per-token losses become one scalar (verl semantics): "token-mean" = mean over
    all response tokens of the global batch; "seq-mean-token-mean" = mean over the
    batch's sequences of each sequence's token mean; "seq-mean-token-sum" = mean over
    sequences of each sequence's token sum. Sequences without response tokens do not count."""
    importance_correction: Literal["tis", "seq_tis", "mask", "decoupled_ppo", "none"] = "tis"
    """Correction between the actors' behaviour policy and the learner, from the ratio
    exp(lp_old - lp_behaviour): "tis" = per-token weight min(ratio, tis_cap);
    "seq_tis" = min(exp(sum over the sequence of the log ratio), tis_cap) for every token
    of the sequence; "mask" = weight 1 for tokens with ratio in [is_mask_low,
    is_mask_high], 0 (dropped, counted) otherwise; "decoupled_ppo" (AReaL) = "tis"
    weights with the PPO clip against lp_old mandatory; "none" = weight 1."""
    tis_cap: float = 2.0
    """Upper bound C of the truncated importance weight (tis, seq_tis, decoupled_ppo)."""
    is_mask_low: float = 0.5
    """importance_correction="mask": tokens with ratio below this are dropped."""
    is_mask_high: float = 2.0
    """importance_correction="mask": tokens with ratio above this are dropped."""
    ppo_clip_low: float | None = 0.2
    """PPO clip epsilon_low: the ratio exp(lp - lp_old) is clipped below at
    1 - ppo_clip_low. A no-op (value and gradient) while lp == lp_old, i.e. with one
    update per step; it acts when learner.ppo_epochs * learner.mini_batches > 1.
    None = no clip (not allowed with decoupled_ppo)."""
    ppo_clip_high: float | None = 0.28
    """PPO clip epsilon_high: the ratio is clipped above at 1 + ppo_clip_high (DAPO's
    clip-higher). None = no clip (not allowed with decoupled_ppo)."""
    ppo_clip_dual: float | None = None
    """Dual-clip PPO bound c > 1 (Ye et al. 2019; verl's clip_ratio_c, 3.0 there): for
    tokens with a negative advantage the per-token policy loss is capped at -c * A, so a
    ratio exp(lp - lp_old) above c stops pushing the token down. Like the PPO clip it
    acts only with several updates per step. None = off (verl's vanilla loss always
    applies it; set 3.0 to match)."""

    def __post_init__(self) -> None:
        _check_positive("loss", self, "tis_cap", "is_mask_high", "kl_clamp", "ppo_clip_high")
        _check_positive("loss", self, "opd_coef", "opd_penalty_coef", "pg_coef", "kl_loss_coef", "entropy_coef",
                        "is_mask_low", allow_zero=True)
        if not 0.0 <= self.discount <= 1.0:
            _fail("loss.discount", self.discount, "must be in [0, 1]", "use 0 (no discount) or a gamma such as 0.99")
        if self.is_mask_low >= self.is_mask_high:
            _fail("loss.is_mask_low", self.is_mask_low,
                  f"must be below loss.is_mask_high={self.is_mask_high} (no ratio would be kept)",
                  "use a band around 1 such as is_mask_low=0.5, is_mask_high=2.0")
        if self.ppo_clip_dual is not None and self.ppo_clip_dual <= 1.0:
            _fail("loss.ppo_clip_dual", self.ppo_clip_dual, "must be > 1 (it bounds a ratio above 1)",
                  "use verl's 3.0, or null to disable the dual clip")
        if self.ppo_clip_low is not None and not 0.0 < self.ppo_clip_low < 1.0:
            _fail("loss.ppo_clip_low", self.ppo_clip_low, "must be in (0, 1) (the lower clip bound is 1 - it)",
                  "use a value such as 0.2, or null to disable the PPO clip")
        if self.importance_correction == "decoupled_ppo" and None in (self.ppo_clip_low, self.ppo_clip_high):
            field_name = "loss.ppo_clip_low" if self.ppo_clip_low is None else "loss.ppo_clip_high"
            _fail(field_name, None, "the decoupled PPO objective (loss.importance_correction=decoupled_ppo) "
                  "needs both PPO clip bounds",
                  "set loss.ppo_clip_low and loss.ppo_clip_high (e.g. 0.2 and 0.28), or use "
                  "loss.importance_correction=tis")
        self.check_not_zero()

    @property
    def kl_active(self) -> bool:
        """Whether the direct KL loss contributes (a resolved kl_loss other than "none")."""
        return self.kl_loss not in ("none", "auto") and self.kl_loss_coef > 0

    def check_not_zero(self) -> None:
        """Refuse an objective that is identically zero (once pg_coef is decided)."""
        if self.pg_coef is None or self.kl_loss == "auto":
            return  # decided by JobConfig, which calls this again
        if self.pg_coef == 0 and not self.kl_active and self.entropy_coef == 0:
            _fail("loss.pg_coef", self.pg_coef,
                  f"with loss.kl_loss={self.kl_loss!r}, loss.kl_loss_coef={self.kl_loss_coef} and "
                  "loss.entropy_coef=0 the loss is identically zero: nothing to train",
                  "set loss.pg_coef > 0, or choose a loss.kl_loss with loss.kl_loss_coef > 0 (pure distillation)")


@dataclass(kw_only=True, slots=True)
class LearnerConfig:
    """The FSDP2 learner: optimisation, checkpoints and weight publication."""

    num_steps: int = 60
    """Optimiser steps in the job (each bumps policy_version by one)."""
    batch_size: int = 64
    """Samples per optimiser step, over all learner ranks."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; None disables clipping."""
    micro_batch_tokens: int = 8192
    """Token budget of one forward/backward micro-batch (padded prompt+response)."""
    param_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """FSDP2 mixed-precision compute dtype; gradients are reduced and master weights
    kept in float32. "auto": bfloat16 on GPU, float32 on the CPU."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping
    them (less memory for long sequences, ~30% more compute)."""
    gpu_memory_utilization: float | None = None
    """On GPU: cap this learner rank's CUDA caching allocator at this fraction of its
    GPU (needed when it shares the GPU with engines). None: no cap on a GPU of its own,
    an equal share of 0.9 on a shared GPU."""
    seed: int = 0
    """Seed of the learner (model init where it is random, data order)."""
    checkpoint_every: int | None = None
    """Write a DCP checkpoint every N steps (and at the end); None: by steps only at the end."""
    checkpoint_every_s: float | None = 300.0
    """Also write a checkpoint when this many seconds of wall time have passed since the
    last one (or the start), so that a long job loses at most that much work to a
    crash; None: by steps only."""
    resume: str | None = "auto"
    """Where training starts. "auto": from the run directory's newest complete
    checkpoint if there is one, else from scratch (one command both starts and, under
    ``torchrun --max-restarts``, resumes a job). "latest": that checkpoint, which must
    exist. A path: that checkpoint directory. None: from scratch, replacing what the
    run directory holds."""
    batch_timeout_s: float = 900.0
    """Seconds the learner waits for its next batch with no scored sample arriving
    before it fails, naming what it waited for (a stalled actor or teacher)."""
    export_hf: bool = True
    """Save the final student in Hugging Face format (run_dir/hf) for `vllm serve`."""
    weight_sync_bucket_mb: float = 32.0
    """Size of one weight-broadcast bucket in MiB (tensors are packed into buckets)."""
    weight_sync_timeout_s: float = 300.0
    """A weight sync that has not completed in this many seconds fails the job."""
    mini_batches: int = 1
    """Optimiser updates per pass over a step's batch (verl's ppo_mini_batch_size =
    batch_size / mini_batches). More than one update per step makes the PPO clip and
    the importance weights act against the log-probs from before the first update."""
    ppo_epochs: int = 1
    """Passes over a step's batch (each pass makes mini_batches updates)."""

    def __post_init__(self) -> None:
        _check_positive("learner", self, "num_steps", "batch_size", "lr", "micro_batch_tokens")
        _check_positive("learner", self, "mini_batches", "ppo_epochs")
        _check_positive("learner", self, "max_grad_norm", "checkpoint_every", "checkpoint_every_s", "batch_timeout_s")
        _check_positive("learner", self, "weight_sync_bucket_mb", "weight_sync_timeout_s")
        _check_positive("learner", self, "weight_decay", allow_zero=True)
        _check_fraction("learner.gpu_memory_utilization", self.gpu_memory_utilization)
