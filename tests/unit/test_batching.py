"""Micro-batch packing: alignment of log-probs to logits, budgets, padding."""

from __future__ import annotations

import numpy as np
import pytest

from asyncopd.learner.batching import MicroBatch, TrainSample, count_response_tokens, pack_micro_batches


def _sample(prompt_len: int, response_len: int, start: int = 10) -> TrainSample:
    prompt = np.arange(start, start + prompt_len, dtype=np.int32)
    response = np.arange(start + 100, start + 100 + response_len, dtype=np.int32)
    behaviour = -np.arange(1, response_len + 1, dtype=np.float32)
    teacher = -np.arange(1, response_len + 1, dtype=np.float32) / 10
    return TrainSample(prompt_ids=prompt, response_ids=response, behaviour_logprobs=behaviour,
                       teacher_logprobs=teacher)


def test_alignment_marks_positions_predicting_response_tokens() -> None:
    (mb,) = pack_micro_batches([_sample(3, 2), _sample(2, 4, start=20)], token_budget=64)
    # Longest first: row 0 is the 2+4 sample, row 1 the 3+2 sample (right-padded).
    assert mb.input_ids.tolist() == [[20, 21, 120, 121, 122, 123], [10, 11, 12, 110, 111, 0]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert mb.response_mask.tolist() == [[False, True, True, True, True, False],
                                         [False, False, True, True, False, False]]
    assert mb.lp_behaviour.tolist() == [[0, -1, -2, -3, -4, 0], [0, 0, -1, -2, 0, 0]]
    assert mb.lp_teacher[1].tolist() == pytest.approx([0, 0, -0.1, -0.2, 0, 0])
    assert mb.num_response_tokens == 6
    # Every marked position t predicts a response token at t + 1.
    for row in range(2):
        for t in np.flatnonzero(mb.response_mask[row].numpy()):
            assert mb.input_ids[row, t + 1] >= 100


def test_budget_is_respected_and_nothing_is_lost() -> None:
    rng = np.random.default_rng(0)
    samples = [_sample(int(rng.integers(1, 8)), int(rng.integers(0, 12)), start=i) for i in range(40)]
    batches = pack_micro_batches(samples, token_budget=48)
    assert all(mb.input_ids.numel() <= 48 for mb in batches)
    assert sum(mb.input_ids.shape[0] for mb in batches) == 40
    assert sum(mb.num_response_tokens for mb in batches) == count_response_tokens(samples)
    assert sum(int(mb.response_mask.sum()) for mb in batches) == count_response_tokens(samples)
    real = sum(int(mb.attention_mask.sum()) for mb in batches)
    padded = sum(mb.input_ids.numel() for mb in batches)
    assert real == sum(s.num_tokens for s in samples)
    assert padded - real < 0.25 * real  # sorting by length keeps padding small


def test_oversized_sample_forms_its_own_micro_batch() -> None:
    batches = pack_micro_batches([_sample(2, 2), _sample(10, 20), _sample(3, 1)], token_budget=16)
    shapes = sorted(tuple(mb.input_ids.shape) for mb in batches)
    assert shapes == [(1, 30), (2, 4)]
    assert pack_micro_batches([], token_budget=16) == []


def test_empty_micro_batch_contributes_no_tokens() -> None:
    mb = MicroBatch.empty()
    assert mb.num_response_tokens == 0 and not mb.response_mask.any()


def test_invalid_samples_and_budget_are_rejected() -> None:
    good = _sample(2, 3)
    with pytest.raises(ValueError, match="teacher_logprobs has 2 entries"):
        TrainSample(prompt_ids=good.prompt_ids, response_ids=good.response_ids,
                    behaviour_logprobs=good.behaviour_logprobs, teacher_logprobs=good.teacher_logprobs[:2])
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        TrainSample(prompt_ids=np.zeros(0, np.int32), response_ids=good.response_ids,
                    behaviour_logprobs=good.behaviour_logprobs, teacher_logprobs=good.teacher_logprobs)
    with pytest.raises(ValueError, match="int32"):
        TrainSample(prompt_ids=good.prompt_ids.astype(np.int64), response_ids=good.response_ids,
                    behaviour_logprobs=good.behaviour_logprobs, teacher_logprobs=good.teacher_logprobs)
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        pack_micro_batches([good], token_budget=0)


def test_top_k_candidates_and_base_advantage_follow_the_alignment() -> None:
    import dataclasses

    plain = _sample(2, 3)
    ids = np.array([[5, 6, -1, -1], [7, -1, -1, -1], [8, 9, 10, -1]], dtype=np.int32)
    lps = -np.arange(12, dtype=np.float32).reshape(3, 4)
    sample = dataclasses.replace(plain, adv_base=0.5, topk_ids=ids, topk_logprobs=lps)
    short = dataclasses.replace(_sample(1, 0, start=30), topk_ids=np.zeros((0, 4), np.int32),
                                topk_logprobs=np.zeros((0, 4), np.float32))
    (mb,) = pack_micro_batches([sample, short], token_budget=64)
    assert mb.topk_ids.shape == (2, 5, 4) and mb.num_sequences == 1
    assert mb.topk_ids[0, 1:4].tolist() == ids.tolist()  # response token i is predicted at prompt_len - 1 + i
    assert mb.topk_ids[0, 0].tolist() == [-1] * 4 and mb.topk_ids[1].eq(-1).all()
    assert mb.topk_lp_teacher[0, 1:4].tolist() == lps.tolist()
    assert mb.adv_base[0].tolist() == [0, 0.5, 0.5, 0.5, 0] and mb.adv_base[1].eq(0).all()


def test_mixed_top_k_widths_are_refused() -> None:
    import dataclasses

    ids = np.zeros((3, 2), np.int32)
    with_k = dataclasses.replace(_sample(2, 3), topk_ids=ids, topk_logprobs=ids.astype(np.float32))
    with pytest.raises(ValueError, match="teacher.top_k"):
        pack_micro_batches([with_k, _sample(2, 3)], token_budget=64)
    with pytest.raises(ValueError, match="both or neither"):
        dataclasses.replace(_sample(2, 3), topk_ids=ids)


def test_topk_overlap_counts_student_ids_among_the_teachers_top_k() -> None:
    from asyncopd.learner.batching import topk_overlap

    student = np.array([[1, 2], [3, 4], [5, 6]], np.int32)
    # Teacher top-2 first, then student-only ids (or -1 where a backend leaves them out).
    union = np.array([[2, 1, -1, -1], [4, 9, 3, -1], [7, 8, -1, -1]], np.int32)
    assert topk_overlap(student, union).tolist() == [1.0, 0.5, 0.0]
