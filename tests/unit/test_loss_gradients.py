"""Gradient directions of the loss family on tiny language models: one SGD step on
each objective moves the student the way the objective says it should."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from asyncopd.config import LossConfig
from asyncopd.learner.advantages import sequence_advantages
from asyncopd.learner.loss import LossInputs, compute_loss, topk_reverse_kl

VOCAB = 12


class BigramLM(nn.Module):
    """The smallest trainable LM: embedding of the previous token -> logits of the next."""

    def __init__(self, seed: int, vocab: int = VOCAB, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, hidden)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, contexts: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V] log-probs
        return torch.log_softmax(self.head(self.embed(contexts)), -1)


def picked(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]


def sgd_step(model: nn.Module, loss: torch.Tensor, lr: float) -> None:
    model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for param in model.parameters():
            param -= lr * param.grad


def one_step(model: nn.Module, inputs: LossInputs, cfg: LossConfig, lr: float) -> None:
    mask = inputs.mask
    out = compute_loss(inputs, cfg, global_num_tokens=int(mask.sum()), global_num_seqs=int(mask.any(-1).sum()))
    sgd_step(model, out.loss, lr)


def on_policy_inputs(lp: torch.Tensor, lp_teacher: torch.Tensor, mask: torch.Tensor, **extra) -> LossInputs:
    # The behaviour policy slightly off the learner's, as with staleness 1.
    return LossInputs(lp=lp, lp_old=lp.detach(), lp_behaviour=lp.detach() - 0.1, lp_teacher=lp_teacher,
                      mask=mask, **extra)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("correction", ["tis", "seq_tis", "mask", "decoupled_ppo", "none"])
def test_opd_step_follows_the_teacher(correction: str, aggregation: str) -> None:
    """A token the teacher likes more than the student gains probability; one it likes
    less loses it (padding around them holds garbage)."""
    model = BigramLM(seed=0)
    contexts = torch.tensor([[0, 2, 5, 0]])  # [B, T]: position 0 is prompt, 3 is padding
    targets = torch.tensor([[2, 1, 3, 0]])
    mask = torch.tensor([[False, True, True, False]])
    before = picked(model(contexts), targets)
    lp_teacher = torch.where(mask, before.detach() + torch.tensor([[0.0, 1.0, -1.0, 0.0]]), math.nan)
    cfg = LossConfig(kl_loss="none", pg_coef=1.0, importance_correction=correction, aggregation=aggregation)
    one_step(model, on_policy_inputs(before, lp_teacher, mask), cfg, lr=0.5)
    after = picked(model(contexts), targets).detach()
    assert after[0, 1] > before[0, 1] + 1e-3
    assert after[0, 2] < before[0, 2] - 1e-3


def test_opd_step_on_a_tiny_transformer() -> None:
    """The same on a tiny Qwen2 (attention couples the positions)."""
    from transformers import Qwen2ForCausalLM

    from asyncopd.tasks.tiny import tiny_config

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config(hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1))
    ids = torch.tensor([[5, 9, 12, 7, 14, 3]])

    def logprobs() -> torch.Tensor:
        out = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
        return torch.cat([picked(out, ids[:, 1:]), torch.zeros(1, 1)], dim=1)  # [B, T], aligned like the learner

    mask = torch.tensor([[False, False, True, True, True, False]])  # response tokens 3..5
    before = logprobs()
    lp_teacher = before.detach() + torch.tensor([[0.0, 0.0, 2.0, 0.0, -2.0, 0.0]])
    one_step(model, on_policy_inputs(before, lp_teacher, mask), LossConfig(kl_loss="none", pg_coef=1.0), lr=0.1)
    after = logprobs().detach()
    assert after[0, 2] > before[0, 2] + 1e-4  # teacher prefers this token
    assert after[0, 4] < before[0, 4] - 1e-4  # teacher dislikes this one


@pytest.mark.parametrize("advantage", ["grpo", "reinforce_pp"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_reward_step_raises_the_rewarded_sample(advantage: str, aggregation: str) -> None:
    """Two samples of one prompt (token 0), the first rewarded: its sequence log-prob
    rises, the other's falls. The teacher agrees with the student (no OPD signal)."""
    model = BigramLM(seed=1)
    contexts = torch.tensor([[0, 4, 6], [0, 7, 1]])  # previous token of each response token
    targets = torch.tensor([[4, 6, 2], [7, 1, 3]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    adv = sequence_advantages(np.array([1.0, 0.0]), np.array([0, 0]), LossConfig(advantage=advantage))
    assert adv[0] > 0 > adv[1]
    before = picked(model(contexts), targets)
    cfg = LossConfig(kl_loss="none", pg_coef=1.0, advantage=advantage, aggregation=aggregation,
                     opd_penalty_coef=1.0)
    inputs = on_policy_inputs(before, before.detach(), mask, adv_base=adv.unsqueeze(1).expand(2, 3))
    one_step(model, inputs, cfg, lr=0.5)
    after = picked(model(contexts), targets).detach().sum(-1)
    assert after[0] > before[0].sum() + 1e-3
    assert after[1] < before[1].sum() - 1e-3


def dense_kls(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """(reverse, forward) KL between [C, V] log-prob rows, averaged over rows."""
    p, q = student.exp(), teacher.exp()
    return float((p * (student - teacher)).sum(-1).mean()), float((q * (teacher - student)).sum(-1).mean())


def sampled_kd_setup(seed: int, samples: int = 1024):
    """A student, a fixed teacher per context, and on-policy samples from the student."""
    model = BigramLM(seed=seed)
    contexts = torch.arange(4)  # [C]
    gen = torch.Generator().manual_seed(seed)
    teacher = torch.log_softmax(2 * torch.randn(4, VOCAB, generator=gen), -1)  # [C, V]
    with torch.no_grad():
        targets = torch.multinomial(model(contexts).exp(), samples, replacement=True, generator=gen)  # [C, N]
    sample_contexts = contexts.unsqueeze(1).expand_as(targets)
    return model, contexts, teacher, sample_contexts, targets


@pytest.mark.parametrize(("kl_loss", "which"), [("k2", 0), ("k3", 1)])
def test_sampled_kl_losses_move_the_student_towards_the_teacher(kl_loss: str, which: int) -> None:
    """Pure distillation on on-policy samples: k2's gradient is the reverse KL's, k3's
    the forward KL's (in expectation), so one step lowers that KL."""
    model, contexts, teacher, sample_contexts, targets = sampled_kd_setup(seed=2)
    before = dense_kls(model(contexts).detach(), teacher)
    lp = picked(model(sample_contexts), targets)  # [C, N]
    lp_teacher = teacher.gather(-1, targets)
    cfg = LossConfig(kl_loss=kl_loss, pg_coef=0.0, kl_loss_coef=1.0)
    one_step(model, on_policy_inputs(lp, lp_teacher, torch.ones_like(targets, dtype=torch.bool)), cfg, lr=0.3)
    after = dense_kls(model(contexts).detach(), teacher)
    assert after[which] < before[which] - 1e-3, (before, after)


def test_k1_loss_gradient_ignores_the_teacher() -> None:
    """k1 = lp - lp_teacher: its gradient is that of the sampled log-probs whatever the
    teacher says (zero in expectation on-policy), so a step only lowers the sampled
    tokens' probability; k1 is meant as a metric or an advantage, not a loss."""
    grads = []
    for shift in (0.0, 3.0):
        model, contexts, teacher, sample_contexts, targets = sampled_kd_setup(seed=3, samples=16)
        lp = picked(model(sample_contexts), targets)
        mask = torch.ones_like(targets, dtype=torch.bool)
        out = compute_loss(on_policy_inputs(lp, teacher.gather(-1, targets) - shift, mask),
                           LossConfig(kl_loss="k1", pg_coef=0.0), global_num_tokens=int(mask.sum()))
        model.zero_grad()
        out.loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        model.zero_grad()
        picked(model(sample_contexts), targets).mean().backward()
        torch.testing.assert_close(grads[-1], torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def union_candidates(student: torch.Tensor, teacher: torch.Tensor, k: int) -> torch.Tensor:
    """[C, 2k] ids: teacher top-k, then student top-k ids the teacher lacks, -1 padded
    (the teacher pool's layout)."""
    rows = []
    for s_row, t_row in zip(student, teacher):
        ids = t_row.topk(k).indices.tolist()
        ids += [i for i in s_row.topk(k).indices.tolist() if i not in ids]
        rows.append(ids + [-1] * (2 * k - len(ids)))
    return torch.tensor(rows)


def test_topk_kl_loss_moves_the_student_towards_the_teacher() -> None:
    """Pure top-k distillation (k=3 of 12 ids, so the tail bucket holds real mass): one
    step lowers both the bucketed KL it optimises and the true reverse KL."""
    model, contexts, teacher, _, _ = sampled_kd_setup(seed=4, samples=1)
    student = model(contexts)  # [C, V]: one position per context
    ids = union_candidates(student.detach(), teacher, k=3)  # [C, K]
    valid = (ids >= 0).unsqueeze(0)  # [1, C, K]

    def candidates(logprobs: torch.Tensor) -> torch.Tensor:  # [C, V] -> [1, C, K], -inf where no id
        return torch.where(valid, logprobs.gather(-1, ids.clamp(min=0)).unsqueeze(0), -math.inf)

    teacher_topk = candidates(teacher)
    assert float(candidates(student.detach()).exp().sum(-1).max()) < 0.95  # a real tail
    before_bucketed = topk_reverse_kl(candidates(student.detach()), teacher_topk, valid).mean()
    before = dense_kls(student.detach(), teacher)
    lp = student[:, 0].unsqueeze(0)  # [1, C]: the sampled-token log-probs, unused by this loss
    inputs = on_policy_inputs(lp, lp.detach(), torch.ones(1, 4, dtype=torch.bool), topk_lp=candidates(student),
                              topk_lp_teacher=teacher_topk, topk_valid=valid)
    one_step(model, inputs, LossConfig(kl_loss="topk", pg_coef=0.0), lr=0.5)
    after = model(contexts).detach()
    assert topk_reverse_kl(candidates(after), teacher_topk, valid).mean() < before_bucketed - 1e-3
    assert dense_kls(after, teacher)[0] < before[0] - 1e-3
