"""loss.kl_loss=full: the exact reverse KL over the whole vocabulary against a dense
reference (values and gradients wrt logits and parameters), chunked == unchunked,
masked positions, a padded teacher head, the in-process teacher's scores, a train
step, and the config rules of an in-process teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from asyncopd.config import ConfigError, LossConfig, from_dict
from asyncopd.learner.batching import TrainSample, pack_micro_batches
from asyncopd.learner.full_kl import MIN_TEACHER_LOGPROB, reverse_kl, teacher_chunk_fn
from asyncopd.learner.loss import LossInputs, compute_loss
from asyncopd.learner import model as model_module
from asyncopd.learner.model import token_stats
from asyncopd.learner.teacher import ColocatedTeacher, placeholder_teacher_logprobs
from asyncopd.learner.train import make_optimizer, train_step
from asyncopd.config import LearnerConfig
from asyncopd.tasks.tiny import save_tiny_model
from asyncopd.types import Rollout


def dense_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """The obvious reference: [..., V] x2 -> [...], plain autograd."""
    log_s, log_t = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    return (log_s.exp() * (log_s - log_t)).sum(-1)


# --- the per-row kernel ----------------------------------------------------------------

def test_reverse_kl_matches_dense_reference_value_and_gradient() -> None:
    torch.manual_seed(0)
    student = (3 * torch.randn(7, 50, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(7, 50, dtype=torch.float64)
    weights = torch.rand(7, dtype=torch.float64)
    got = reverse_kl(student, torch.log_softmax(teacher, -1))
    (got * weights).sum().backward()
    grad_got = student.grad.clone()
    student.grad = None
    want = dense_reverse_kl(student, teacher)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_got, student.grad, rtol=1e-9, atol=1e-12)
    assert (got > 0).all()


def test_reverse_kl_passes_gradcheck_and_is_zero_at_the_teacher() -> None:
    torch.manual_seed(1)
    student = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    teacher_lp = torch.log_softmax(torch.randn(3, 9, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda z: reverse_kl(z, teacher_lp), (student,))
    same = reverse_kl(teacher_lp.clone().requires_grad_(), teacher_lp)
    torch.testing.assert_close(same, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_reverse_kl_is_finite_where_the_teacher_masks_tokens() -> None:
    """A teacher logit of -inf (a masked id) gives a large, finite KL and gradient."""
    student = torch.zeros(2, 5, requires_grad=True)
    teacher_lp = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0, 0.0, -float("inf")]] * 2), -1)
    kl = reverse_kl(student, teacher_lp)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(student.grad).all()
    assert kl[0].item() == pytest.approx(0.2 * (np.log(0.2) - MIN_TEACHER_LOGPROB) + 0.8 * np.log(0.2 / 0.25),
                                         rel=1e-5)
    assert student.grad[0, 4] > 0  # pushes mass off the masked id


# --- through token_stats with tiny transformers ----------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fullkl")
    return save_tiny_model(root / "student", seed=0), save_tiny_model(root / "teacher", seed=1, num_layers=3)


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two right-padded rows: ids [2, 9], attention [2, 9], response mask [2, 9]."""
    ids = torch.tensor([[5, 9, 12, 7, 30, 31, 8, 2, 4], [6, 14, 11, 20, 21, 3, 0, 0, 0]])
    attention = (torch.arange(9) < torch.tensor([[9], [6]])).long()
    response = torch.zeros(2, 9, dtype=torch.bool)
    response[0, 3:8] = True  # tokens 4..8 of row 0 are the response (predicted at 3..7)
    response[1, 2:5] = True  # tokens 3..5 of row 1
    return ids, attention, response


def _student(path: Path) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()  # no dropout in the tiny models either way


def _chunked(student: nn.Module, teacher: ColocatedTeacher, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    ids, attention, response = _batch()
    student.zero_grad()
    fn = teacher.full_kl_fn(ids, attention, response)
    rows_seen: list[int] = []

    def recording(logits: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        rows_seen.append(logits.shape[0])
        return fn(logits, start, stop)

    stats = token_stats(student, ids, attention, chunk_tokens=chunk_tokens, chunk_fn=recording)
    kl, lp_teacher = stats.extra[..., 0], stats.extra[..., 1]
    (kl * torch.linspace(0.5, 1.5, 9)).sum().backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    assert max(rows_seen) <= chunk_tokens
    # Checkpointed chunks run chunk_fn again in backward; small ones keep their logits.
    recomputed = model_module._CHECKPOINT_MIN_LOGITS < min(chunk_tokens, 16) * student.config.vocab_size
    num_chunks = -(-16 // chunk_tokens)  # 2 rows x 8 predicting positions
    assert len(rows_seen) > num_chunks if recomputed else len(rows_seen) == num_chunks
    return kl.detach(), lp_teacher, grads


@pytest.mark.parametrize("checkpoint_min_logits", [0, model_module._CHECKPOINT_MIN_LOGITS])
def test_chunked_full_kl_matches_the_dense_reference_with_parameter_gradients(
        models: tuple[Path, Path], checkpoint_min_logits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_module, "_CHECKPOINT_MIN_LOGITS", checkpoint_min_logits)
    student_path, teacher_path = models
    student, teacher = _student(student_path), ColocatedTeacher(teacher_path)
    ids, attention, response = _batch()

    student.zero_grad()
    logits = student(input_ids=ids, attention_mask=attention).logits.float()  # [B, T, V]
    with torch.no_grad():
        teacher_logits = teacher.model(input_ids=ids, attention_mask=attention).logits.float()
    dense = torch.where(response, dense_reverse_kl(logits, teacher_logits), 0.0)  # [B, T]
    (dense * torch.linspace(0.5, 1.5, 9)).sum().backward()
    dense_grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    lp_t = torch.log_softmax(teacher_logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)

    for chunk_tokens in (3, 5, 10_000):  # chunks that split rows and responses, and one for all
        kl, lp_teacher, grads = _chunked(student, teacher, chunk_tokens)
        torch.testing.assert_close(kl, dense.detach(), rtol=1e-5, atol=1e-6)
        assert (kl[~response] == 0).all() and (kl[response] > 0).all()
        torch.testing.assert_close(lp_teacher[:, :-1][response[:, :-1]], lp_t[response[:, :-1]], rtol=1e-5, atol=1e-6)
        assert (lp_teacher[~response] == 0).all()
        assert grads.keys() == dense_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, dense_grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_masked_positions_get_no_gradient(models: tuple[Path, Path]) -> None:
    """Only response positions feed the KL: a batch without response positions leaves
    every gradient at zero (and the prompt of a row does not change its KL)."""
    student_path, teacher_path = models
    student, teacher = _student(student_path), ColocatedTeacher(teacher_path)
    ids, attention, _ = _batch()
    fn = teacher.full_kl_fn(ids, attention, torch.zeros(2, 9, dtype=torch.bool))
    stats = token_stats(student, ids, attention, chunk_tokens=4, chunk_fn=fn)
    assert (stats.extra == 0).all()
    assert not stats.extra.requires_grad or all(
        g is None or (g == 0).all() for g in torch.autograd.grad(stats.extra.sum(), list(student.parameters()),
                                                                 allow_unused=True))


def test_a_wider_teacher_head_is_compared_on_the_shared_ids() -> None:
    """A teacher whose embedding matrix is padded (3 extra ids) is renormalised over the
    student's ids: the KL is that of the first V logits of both."""
    torch.manual_seed(2)
    vocab, hidden = 11, 6
    head = nn.Linear(hidden, vocab + 3)
    teacher_hidden = torch.randn(1, 5, hidden)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    response = torch.tensor([[False, True, True, True, False]])
    fn = teacher_chunk_fn(teacher_hidden, head, ids, response, vocab_size=vocab)
    student_logits = torch.randn(4, vocab, requires_grad=True)  # the 4 flat positions of the row
    out = fn(student_logits, 0, 4)
    want = dense_reverse_kl(student_logits[1:4], head(teacher_hidden[0, 1:4]).detach()[:, :vocab])
    torch.testing.assert_close(out[1:4, 0], want)
    assert out[0, 0] == 0
    with pytest.raises(ValueError, match="vocab_size"):
        teacher_chunk_fn(teacher_hidden, head, ids, response)(student_logits, 0, 4)


@pytest.mark.parametrize("vocab", [150_000])
def test_full_kl_at_a_150k_vocabulary_in_chunks(vocab: int) -> None:
    """A Qwen-sized vocabulary through the chunk function, 8 positions per chunk: the
    same values as the dense reference, and no chunk sees more than 8 rows."""
    torch.manual_seed(3)
    hidden, num = 8, 24
    student_head, teacher_head = nn.Linear(hidden, vocab, bias=False), nn.Linear(hidden, vocab, bias=False)
    ids = torch.randint(0, vocab, (2, num // 2 + 1))
    response = torch.ones(2, num // 2 + 1, dtype=torch.bool)
    response[:, -1] = False
    student_hidden = torch.randn(2, num // 2 + 1, hidden, requires_grad=True)
    teacher_hidden = torch.randn(2, num // 2 + 1, hidden)
    fn = teacher_chunk_fn(teacher_hidden, teacher_head, ids, response)
    flat = student_hidden[:, :-1].reshape(num, hidden)
    kl = torch.cat([fn(student_head(flat[s:s + 8]), s, min(s + 8, num))[:, 0] for s in range(0, num, 8)])
    want = dense_reverse_kl(student_head(flat), teacher_head(teacher_hidden[:, :-1].reshape(num, hidden)))
    torch.testing.assert_close(kl, want.detach(), rtol=1e-4, atol=1e-5)
    kl.sum().backward()
    assert torch.isfinite(student_hidden.grad).all() and student_hidden.grad.abs().sum() > 0


# --- the loss, the teacher's scores, a train step ----------------------------------------------

def test_compute_loss_full_is_the_masked_mean_of_the_full_kl() -> None:
    full_kl = torch.tensor([[0.0, 0.5, 1.5, float("nan")]], requires_grad=True)
    mask = torch.tensor([[False, True, True, False]])
    lp = torch.zeros(1, 4, requires_grad=True)
    inputs = LossInputs(lp=lp, lp_old=lp.detach(), lp_behaviour=torch.zeros(1, 4), lp_teacher=torch.zeros(1, 4),
                        mask=mask, full_kl=full_kl)
    out = compute_loss(inputs, LossConfig(kl_loss="full", pg_coef=0.0, kl_clamp=0.1), global_num_tokens=2)
    assert out.loss.item() == pytest.approx(1.0)  # kl_clamp does not apply to an exact KL
    assert out.metrics["learner/kl_loss"].item() == pytest.approx(1.0)
    out.loss.backward()
    assert full_kl.grad.tolist() == [[0.0, 0.5, 0.5, 0.0]]
    with pytest.raises(ValueError, match="colocated"):
        compute_loss(LossInputs(lp=lp, lp_old=lp.detach(), lp_behaviour=torch.zeros(1, 4),
                                lp_teacher=torch.zeros(1, 4), mask=mask),
                     LossConfig(kl_loss="full", pg_coef=0.0), global_num_tokens=2)


def _rollout(i: int, prompt: list[int], response: list[int]) -> Rollout:
    n = len(response)
    return Rollout(rollout_id=f"0-{i}", kind="train", batch_index=0, group_id=i, actor_index=0,
                   prompt_ids=np.array(prompt, dtype=np.int32), response_ids=np.array(response, dtype=np.int32),
                   behaviour_logprobs=np.full(n, -1.0, dtype=np.float32),
                   token_policy_versions=np.zeros(n, dtype=np.int32), policy_version=0, reward=0.0,
                   finish_reason="stop")


def test_colocated_teacher_scores_like_a_dense_forward(models: tuple[Path, Path]) -> None:
    _, teacher_path = models
    teacher = ColocatedTeacher(teacher_path)
    rollouts = [_rollout(0, [5, 9, 12], [7, 30, 31, 8]), _rollout(1, [6], [14]), _rollout(2, [4, 4], [20, 21, 3])]
    scores = teacher.score(rollouts, max_batch_tokens=8)  # forces several forwards
    for rollout, got in zip(rollouts, scores):
        ids = torch.from_numpy(np.concatenate([rollout.prompt_ids, rollout.response_ids]).astype(np.int64))[None]
        with torch.no_grad():
            lp = torch.log_softmax(teacher.model(input_ids=ids).logits[0].float(), -1)
        start, n = rollout.prompt_ids.shape[0], rollout.response_ids.shape[0]
        want = lp[start - 1:start - 1 + n].gather(-1, ids[0, start:, None]).squeeze(-1)
        assert got.dtype == np.float32 and got.shape == (n,)
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert np.isnan(placeholder_teacher_logprobs(rollouts[0])).all()


def test_train_step_with_a_colocated_teacher_lowers_the_full_kl(models: tuple[Path, Path]) -> None:
    """Samples arrive with NaN teacher log-probs; the step scores them in process, the
    reported kl_loss is the dense mean KL, and a few steps lower it."""
    student_path, teacher_path = models
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(str(student_path), dtype=torch.float32)
    student.config.use_cache = False
    teacher = ColocatedTeacher(teacher_path)
    rollouts = [_rollout(i, [5 + i, 9, 12], [7 + i, 30, 31, 8]) for i in range(4)]
    samples = [TrainSample.from_scored(_scored(r)) for r in rollouts]
    learner_cfg = LearnerConfig(lr=3e-3)
    optimizer = make_optimizer(student, learner_cfg)
    loss_cfg = LossConfig(kl_loss="full", pg_coef=0.0)

    mb = pack_micro_batches(samples, 10_000)[0]
    with torch.no_grad():
        logits = student(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
        teacher_logits = teacher.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    dense = dense_reverse_kl(logits, teacher_logits)[mb.response_mask].mean().item()

    history = [train_step(student, optimizer, samples, loss_cfg, learner_cfg, teacher=teacher) for _ in range(5)]
    assert history[0]["learner/kl_loss"] == pytest.approx(dense, rel=1e-4)
    assert all(np.isfinite(h["learner/loss"]) and np.isfinite(h["learner/rkl"]) for h in history)
    assert history[-1]["learner/kl_loss"] < 0.8 * history[0]["learner/kl_loss"]


def _scored(rollout: Rollout):
    from asyncopd.types import ScoredRollout

    return ScoredRollout(rollout=rollout, teacher_logprobs=placeholder_teacher_logprobs(rollout), teacher_index=-1,
                         score_s=0.0, policy_version=rollout.policy_version)


# --- config ---------------------------------------------------------------------------------

def test_full_kl_without_an_in_process_teacher_says_to_use_topk() -> None:
    with pytest.raises(ConfigError, match=r"loss.kl_loss='full'.*teacher.backend=colocated.*loss.kl_loss=topk"):
        from_dict({"loss": {"kl_loss": "full", "pg_coef": 0.0}})


@pytest.mark.parametrize(("overrides", "message"), [
    ({"teacher": {"backend": "colocated"}}, r"cluster.teachers=1.*set cluster.teachers=0"),
    ({"cluster": {"teachers": 0}}, r"cluster.teachers=0.*teacher.backend=colocated"),
    ({"teacher": {"backend": "colocated", "top_k": 8}, "cluster": {"teachers": 0}}, r"teacher.top_k=8.*kl_loss=full"),
    ({"teacher": {"backend": "colocated"}, "cluster": {"teachers": 0}, "loss": {"kl_loss": "topk"}},
     r"loss.kl_loss='topk'.*use loss.kl_loss=full"),
])
def test_teacher_placement_is_validated(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(overrides)


def test_colocated_full_kl_is_a_valid_job() -> None:
    cfg = from_dict({"teacher": {"backend": "colocated"}, "cluster": {"teachers": 0},
                     "loss": {"kl_loss": "full", "pg_coef": 0.0}})
    assert cfg.cluster.world_size == 2 and cfg.loss.kl_loss == "full"


def test_train_step_with_a_colocated_teacher_scores_for_the_opd_advantage(models: tuple[Path, Path]) -> None:
    """Without kl_loss=full the in-process teacher still replaces the NaN placeholders:
    learner/rkl is the dense mean of lp_student - lp_teacher on the sampled tokens."""
    student_path, teacher_path = models
    student = AutoModelForCausalLM.from_pretrained(str(student_path), dtype=torch.float32)
    student.config.use_cache = False
    teacher = ColocatedTeacher(teacher_path)
    samples = [TrainSample.from_scored(_scored(_rollout(i, [5 + i, 9], [7 + i, 30, 8]))) for i in range(3)]
    mb = pack_micro_batches(samples, 10_000)[0]
    with torch.no_grad():
        def picked(model: nn.Module) -> torch.Tensor:
            lp = torch.log_softmax(model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits, -1)
            return lp[:, :-1].gather(-1, mb.input_ids[:, 1:, None]).squeeze(-1)[mb.response_mask[:, :-1]]
        want = (picked(student) - picked(teacher.model)).mean().item()
    learner_cfg = LearnerConfig(lr=1e-3)
    metrics = train_step(student, make_optimizer(student, learner_cfg), samples,
                         LossConfig(kl_loss="none", pg_coef=1.0), learner_cfg, teacher=teacher)
    assert metrics["learner/rkl"] == pytest.approx(want, rel=1e-4)
    assert np.isfinite(metrics["learner/loss"]) and metrics["learner/kl_loss"] == 0.0
