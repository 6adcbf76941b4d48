"""HFScorer against a dense, per-token reference: sampled-token log-probs and the
top-k support (teacher top-k, then the student's ids the teacher lacks, -1 padding)
with the teacher's log-prob of every id; and teacher.top_k validation."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from asyncopd.config import MAX_TOP_K, ConfigError, TeacherConfig
from asyncopd.tasks.tiny import save_tiny_model
from asyncopd.teacher.scorer import HFScorer
from asyncopd.types import Rollout

K = 4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=1)


@pytest.fixture(scope="module")
def reference(model_path: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()


@torch.no_grad()
def dense_logprobs(model: PreTrainedModel, rollout: Rollout) -> np.ndarray:
    """[n, vocab]: log-softmax of one unpadded forward at every response position."""
    ids = torch.from_numpy(np.concatenate([rollout.prompt_ids, rollout.response_ids]).astype(np.int64))[None]
    p = rollout.prompt_ids.shape[0]
    return torch.log_softmax(model(ids).logits[0].float(), -1)[p - 1 : -1].numpy()


def reference_union(logprobs: np.ndarray, student: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The slow, obvious version: a Python loop over tokens and ids."""
    ids = np.full((logprobs.shape[0], 2 * k), -1, np.int32)
    lps = np.zeros((logprobs.shape[0], 2 * k), np.float32)
    for t, row in enumerate(logprobs):
        union = [int(i) for i in np.argsort(-row, kind="stable")[:k]]
        for i in [] if student is None else student[t]:
            if int(i) not in union:
                union.append(int(i))
        ids[t, : len(union)] = union
        lps[t, : len(union)] = row[union]
    return ids, lps


def make_rollout(rng: np.random.Generator, i: int, reference: PreTrainedModel | None = None, *,
                 kind: str = "train", k: int | None = K) -> Rollout:
    prompt = rng.integers(3, 98, size=int(rng.integers(1, 7))).astype(np.int32)
    n = int(rng.integers(0, 6)) if i else 5  # includes empty responses
    response = rng.integers(3, 98, size=n).astype(np.int32)
    rollout = Rollout(rollout_id=f"0-{i}", kind=kind, batch_index=0, group_id=i, actor_index=0,
                      prompt_ids=prompt, response_ids=response, behaviour_logprobs=np.zeros(n, np.float32),
                      token_policy_versions=np.zeros(n, np.int32), policy_version=0, reward=0.0,
                      finish_reason="stop")
    if k is None:
        return rollout
    student = np.array([rng.choice(98, size=k, replace=False) for _ in range(n)], np.int32).reshape(n, k)
    if reference is not None and n:
        # Make the student share ids with the teacher, in front of, between and behind
        # its own ids (row t: all k reversed; the top-2 first; the top-1 second; none).
        teacher_top = np.argsort(-dense_logprobs(reference, rollout), axis=1)[:, :k]
        for t in range(n):
            rest = rng.choice(np.setdiff1d(np.arange(98), teacher_top[t]), size=k, replace=False).tolist()
            student[t] = [teacher_top[t][::-1].tolist(),
                          [*teacher_top[t, :2], *rest[: k - 2]],
                          [rest[0], teacher_top[t, 0], *rest[1 : k - 1]],
                          rest[:k]][t % 4]
    return msgspec.structs.replace(rollout, student_topk_ids=student)


def test_sampled_logprobs_match_dense_reference_without_topk(model_path: Path, reference: PreTrainedModel) -> None:
    rng = np.random.default_rng(0)
    rollouts = [make_rollout(rng, i, k=None) for i in range(6)]
    scores = HFScorer(str(model_path)).score(rollouts)
    assert len(scores) == len(rollouts)
    for r, score in zip(rollouts, scores):
        want = dense_logprobs(reference, r)[np.arange(r.response_ids.shape[0]), r.response_ids]
        assert score.logprobs.dtype == np.float32
        np.testing.assert_allclose(score.logprobs, want, atol=1e-5, rtol=0)
        assert score.topk_ids is None and score.topk_logprobs is None


def test_topk_union_matches_dense_reference(model_path: Path, reference: PreTrainedModel) -> None:
    rng = np.random.default_rng(1)
    rollouts = [make_rollout(rng, i, reference) for i in range(8)]  # batched: padding must not leak
    scores = HFScorer(str(model_path), top_k=K).score(rollouts)
    num_shared = num_padded = 0
    for r, score in zip(rollouts, scores):
        n = r.response_ids.shape[0]
        dense = dense_logprobs(reference, r)
        want_ids, want_lps = reference_union(dense, r.student_topk_ids, K)
        assert score.topk_ids.dtype == np.int32 and score.topk_ids.shape == (n, 2 * K)
        assert score.topk_logprobs.dtype == np.float32 and score.topk_logprobs.shape == (n, 2 * K)
        np.testing.assert_array_equal(score.topk_ids, want_ids)
        np.testing.assert_allclose(score.topk_logprobs, want_lps, atol=1e-5, rtol=0)
        np.testing.assert_allclose(score.logprobs, dense[np.arange(n), r.response_ids], atol=1e-5, rtol=0)
        # Teacher half: the k most likely ids, most likely first.
        assert (np.diff(score.topk_logprobs[:, :K], axis=1) <= 0).all()
        padded = score.topk_ids == -1
        assert (score.topk_logprobs[padded] == 0).all()
        num_padded += int(padded.sum())
        num_shared += int(padded.any(axis=1).sum())
    # The fixture made the student share ids with the teacher, so the union shrank and padded.
    assert num_shared >= 6 and num_padded >= 12


def test_greedy_rollout_without_student_ids_gets_teacher_topk_only(model_path: Path,
                                                                  reference: PreTrainedModel) -> None:
    rollout = make_rollout(np.random.default_rng(2), 0, kind="eval_greedy", k=None)
    score = HFScorer(str(model_path), top_k=K).score([rollout])[0]
    want_ids, want_lps = reference_union(dense_logprobs(reference, rollout), None, K)
    np.testing.assert_array_equal(score.topk_ids, want_ids)
    np.testing.assert_allclose(score.topk_logprobs, want_lps, atol=1e-5, rtol=0)
    assert (score.topk_ids[:, K:] == -1).all()


def test_one_batch_mixing_greedy_and_sampled_rollouts_scores_each_as_alone(
        model_path: Path, reference: PreTrainedModel) -> None:
    # The scorer handles all response positions of a batch at once; rows must not leak.
    rng = np.random.default_rng(3)
    rollouts = [make_rollout(rng, i, reference, kind="eval_greedy", k=None) if i % 3 == 1
                else make_rollout(rng, i, reference) for i in range(9)]
    scores = HFScorer(str(model_path), top_k=K).score(rollouts)
    for r, score in zip(rollouts, scores):
        dense = dense_logprobs(reference, r)
        want_ids, want_lps = reference_union(dense, r.student_topk_ids, K)
        np.testing.assert_array_equal(score.topk_ids, want_ids)
        np.testing.assert_allclose(score.topk_logprobs, want_lps, atol=1e-5, rtol=0)
        np.testing.assert_allclose(score.logprobs, dense[np.arange(len(r.response_ids)), r.response_ids],
                                   atol=1e-5, rtol=0)
    empty = make_rollout(rng, 1, kind="eval_greedy", k=None)
    empty = msgspec.structs.replace(empty, response_ids=np.zeros(0, np.int32),
                                    behaviour_logprobs=np.zeros(0, np.float32),
                                    token_policy_versions=np.zeros(0, np.int32))
    alone = HFScorer(str(model_path), top_k=K).score([empty])[0]
    assert alone.logprobs.shape == (0,) and alone.topk_ids.shape == (0, 2 * K)


def test_rollouts_that_do_not_fit_the_teacher_are_refused(model_path: Path) -> None:
    rng = np.random.default_rng(3)
    scorer = HFScorer(str(model_path), top_k=K)
    with pytest.raises(ValueError, match="carries no student_topk_ids but teacher.top_k=4"):
        scorer.score([make_rollout(rng, 0, k=None)])
    with pytest.raises(ValueError, match="carries 2 student top-k ids per token, teacher.top_k=4"):
        scorer.score([make_rollout(rng, 0, k=2)])
    bad = make_rollout(rng, 0)
    ids = bad.student_topk_ids.copy()
    ids[0, 0] = 500
    with pytest.raises(ValueError, match="token id 500 outside the teacher's vocabulary"):
        scorer.score([msgspec.structs.replace(bad, student_topk_ids=ids)])
    with pytest.raises(ValueError, match=r"teacher.top_k=99: must be in \[0, 98\]"):
        HFScorer(str(model_path), top_k=99)


def test_teacher_top_k_is_validated() -> None:
    assert TeacherConfig().top_k is None  # decided with the objective, in JobConfig
    assert TeacherConfig(top_k=MAX_TOP_K).top_k == MAX_TOP_K
    with pytest.raises(ConfigError, match=r"teacher.top_k=-1: must be >= 0"):
        TeacherConfig(top_k=-1)
    with pytest.raises(ConfigError, match=rf"teacher.top_k={MAX_TOP_K + 1}: exceeds the cap.*Fix: use teacher.top_k "
                                          rf"<= {MAX_TOP_K}.*max_logprobs"):
        TeacherConfig(top_k=MAX_TOP_K + 1)


def test_teacher_worker_forwards_topk_to_the_learner(model_path: Path) -> None:
    import zmq

    from asyncopd.teacher.worker import TeacherWorker
    from asyncopd.transport.sockets import Channel
    from asyncopd.types import ScoreAckBatch, ScoredBatch

    scorer = HFScorer(str(model_path), top_k=K)
    worker = TeacherWorker(scorer, index=0, host="127.0.0.1", max_batch_tokens=256)
    learner = Channel(zmq.PULL, bind_host="127.0.0.1")
    actor = Channel(zmq.DEALER, connect=[worker.router.address], identity=b"actor-0")
    try:
        worker.connect_learner(learner.address)
        rollout = make_rollout(np.random.default_rng(4), 0)
        actor.send(rollout)
        worker.serve_once(timeout_s=5.0)
        received = learner.recv(timeout_s=5.0)
        assert received is not None and isinstance(received[1], ScoredBatch)
        (scored,), want = received[1].scored, scorer.score([rollout])[0]
        assert scored.rollout.student_topk_ids.shape == (5, K)
        np.testing.assert_array_equal(scored.topk_ids, want.topk_ids)
        np.testing.assert_array_equal(scored.topk_logprobs, want.topk_logprobs)
        ack = actor.recv(timeout_s=5.0)
        assert isinstance(ack[1], ScoreAckBatch) and [a.ok for a in ack[1].acks] == [True]
    finally:
        for channel in (actor, learner):
            channel.close()
        worker.close()
