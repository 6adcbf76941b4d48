"""The exact reverse KL over the whole vocabulary, chunk by chunk (``loss.kl_loss=full``).

Per response position ``t``::

    KL_t = sum_v p_s(v) (log p_s(v) - log p_t(v))        (student s, teacher t)

which is what TRL's ``DistillationTrainer`` / GKD compute with ``beta=1``, but
never over ``[all tokens, V]`` at once: :func:`teacher_chunk_fn` builds a
:data:`~asyncopd.learner.model.ChunkFn` that :func:`~asyncopd.learner.model.token_stats`
calls on each chunk of the student's logits (``chunk_tokens`` positions) inside
its checkpointed vocabulary pass. The function projects the teacher's hidden
states of the same positions through the teacher's head (no grad) and returns,
per position, the KL (with grad through the student's logits) and the teacher's
log-prob of the sampled token. In backward the chunk is recomputed (student and
teacher head), so memory holds a few ``[chunk_tokens, V]`` buffers, never
``[tokens, V]``. Only response positions are projected.

:func:`reverse_kl` is the per-row kernel: a custom autograd function that keeps
only its inputs for backward and uses the closed-form gradient
``dKL/dz_s(v) = p_s(v) (log p_s(v) - log p_t(v) - KL)``.

Who calls it: :mod:`asyncopd.learner.train` with a
:class:`~asyncopd.learner.teacher.ColocatedTeacher`. This module knows nothing
about models beyond "hidden states and a head", micro-batches or ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from asyncopd.learner.model import ChunkFn

__all__ = ["MIN_TEACHER_LOGPROB", "reverse_kl", "teacher_chunk_fn"]

MIN_TEACHER_LOGPROB = -1e4
"""Floor of the teacher's log-probs (nats). A finite-logit softmax never goes this low;
the floor keeps p_s * (log p_s - log p_t) finite (and its gradient) where a teacher
masks a token with -inf logits."""


class _ReverseKL(torch.autograd.Function):
    """KL(softmax(z_s) || exp(lp_t)) per row; gradient to z_s only."""

    @staticmethod
    def forward(ctx, logits: Tensor, teacher_logprobs: Tensor) -> Tensor:  # [n, V], [n, V] -> [n]
        ctx.save_for_backward(logits, teacher_logprobs)
        log_p = torch.log_softmax(logits, dim=-1)
        diff = log_p - teacher_logprobs
        return diff.mul_(log_p.exp_()).sum(-1)  # in place: two [n, V] buffers in all

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        logits, teacher_logprobs = ctx.saved_tensors
        log_p = torch.log_softmax(logits, dim=-1)
        diff = log_p - teacher_logprobs
        p = log_p.exp_()
        kl = (p * diff).sum(-1)
        return p.mul_(diff.sub_(kl.unsqueeze(-1))).mul_(grad.unsqueeze(-1)), None


def reverse_kl(student_logits: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """``sum_v p_s(v) (log p_s(v) - lp_t(v))`` per row: student_logits float [n, V]
    (any normalisation; with grad), teacher_logprobs float [n, V] (normalised, no
    grad, clamped below at :data:`MIN_TEACHER_LOGPROB`) -> [n]."""
    if student_logits.shape != teacher_logprobs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher log-probs "
                         f"{tuple(teacher_logprobs.shape)} must have the same [rows, vocab] shape")
    return _ReverseKL.apply(student_logits, teacher_logprobs.detach().clamp(min=MIN_TEACHER_LOGPROB))


def teacher_chunk_fn(teacher_hidden: Tensor, teacher_head: nn.Module, input_ids: Tensor,
                     response_mask: Tensor, *, vocab_size: int | None = None) -> ChunkFn:
    """The :data:`ChunkFn` of ``loss.kl_loss=full`` for one micro-batch.

    teacher_hidden: [B, T, H] the teacher's last hidden states over the same
    right-padded ``input_ids`` [B, T] (no grad); response_mask: bool [B, T], True where
    token ``t + 1`` is a response token. ``vocab_size``: compare the first this many
    ids only (None: both heads' width, which must then agree), for a teacher whose
    embedding matrix is padded differently from the student's. The function maps a
    chunk's student logits [n, V] to [n, 2]: column 0 the full reverse KL (0 off the
    response), column 1 the teacher's log-prob of token ``t + 1`` (no grad).
    """
    batch, seq = input_ids.shape
    num = batch * (seq - 1)
    flat_hidden = teacher_hidden[:, :-1].reshape(num, teacher_hidden.shape[-1])  # [N, H]
    flat_targets = input_ids[:, 1:].reshape(num)  # [N]
    flat_mask = response_mask[:, :-1].reshape(num)  # [N]

    def chunk_fn(logits: Tensor, start: int, stop: int) -> Tensor:
        rows = flat_mask[start:stop].nonzero().squeeze(-1)  # [m]
        kl = logits.new_zeros(stop - start)
        lp_teacher = logits.new_zeros(stop - start)
        if rows.numel():
            width = vocab_size if vocab_size is not None else logits.shape[-1]
            with torch.no_grad():
                teacher_logits = teacher_head(flat_hidden[start:stop][rows]).float()  # [m, V_t]
                if vocab_size is None and teacher_logits.shape[-1] != logits.shape[-1]:
                    raise ValueError(f"teacher head width {teacher_logits.shape[-1]} differs from the student's "
                                     f"{logits.shape[-1]}; pass vocab_size (the shared tokenizer's ids)")
                teacher_lp = teacher_logits[:, :width]
                teacher_lp = teacher_lp.sub_(teacher_lp.logsumexp(-1, keepdim=True)).clamp_(min=MIN_TEACHER_LOGPROB)
                targets = flat_targets[start:stop][rows]  # [m]
                picked = teacher_lp.gather(1, targets.clamp(max=width - 1)[:, None]).squeeze(1)
                picked = torch.where(targets < width, picked, MIN_TEACHER_LOGPROB)  # an id the teacher lacks
                lp_teacher = lp_teacher.index_put((rows,), picked)
            student = logits if rows.numel() == logits.shape[0] else logits[rows]  # no copy when all rows count
            kl = kl.index_put((rows,), _ReverseKL.apply(student[:, :width], teacher_lp))
        return torch.stack([kl, lp_teacher], dim=-1)  # [n, 2]

    return chunk_fn
