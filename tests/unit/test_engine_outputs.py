"""How the actor's engine turns vLLM's record of a finished request into a Completion.

The engine asks vLLM for one output per request, when it finishes (FINAL_ONLY): all
token ids, the ``FlatLogprobs`` of every position (sampled token first, then the
top-k with ranks 1..k) and the weight-version spans. These tests feed hand-built
records of that layout (a stand-in with FlatLogprobs' fields, no vLLM import) and
check the arrays, the policy_version of every token across a weight load, and that a
record of another layout is refused rather than unpacked into wrong ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from asyncopd.actor.completions import Completion, Finished, PendingRequest, _policy_versions, complete_all


@dataclass
class Flat:
    """The fields of vLLM's FlatLogprobs the engine reads."""

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    def add(self, ids: list[int], logprobs: list[float], ranks: list[int]) -> None:
        self.start_indices.append(len(self.token_ids))
        self.token_ids += ids
        self.logprobs += logprobs
        self.ranks += ranks
        self.end_indices.append(len(self.token_ids))

    def __len__(self) -> int:
        return len(self.start_indices)


def sampled_record(sampled: list[int], top_k: int, seed: int = 0) -> tuple[Flat, list[list[int]], list[float]]:
    """A FlatLogprobs as vLLM fills it for ``sampled``, with the top-k rows and log-probs used."""
    rng = np.random.default_rng(seed)
    flat, rows, behaviour = Flat(), [], []
    for token in sampled:
        row = rng.permutation(50)[:top_k].tolist()
        logprob = float(np.float32(-rng.random()))
        flat.add([token, *row], [logprob, *np.float32(-rng.random(top_k)).tolist()], [7, *range(1, top_k + 1)])
        rows.append(row)
        behaviour.append(logprob)
    return flat, rows, behaviour


def test_sampled_tokens_logprobs_and_topk_rows_are_unpacked_in_order() -> None:
    sampled = [5, 9, 9, 2]
    flat, rows, behaviour = sampled_record(sampled, top_k=3)
    done = PendingRequest(top_k=3).complete("r", "stop", sampled, flat, [("4", 0)])
    assert done.token_ids.dtype == np.int32 and done.token_ids.tolist() == sampled
    assert done.logprobs.dtype == np.float32 and done.logprobs.tolist() == behaviour
    assert done.topk_ids.dtype == np.int32 and done.topk_ids.tolist() == rows
    assert done.token_policy_versions.tolist() == [4, 4, 4, 4]
    assert done.finish_reason == "stop"


def test_without_topk_only_the_sampled_logprob_is_kept() -> None:
    flat, _, behaviour = sampled_record([3, 4], top_k=0)
    done = PendingRequest(top_k=0).complete("g", "length", [3, 4], flat, [("0", 0)])
    assert done.topk_ids is None and done.logprobs.tolist() == behaviour


def test_tokens_after_a_weight_load_carry_the_new_version() -> None:
    assert _policy_versions([("5", 0), ("6", 3)], 5, "r").tolist() == [5, 5, 5, 6, 6]
    assert _policy_versions([("7", 0)], 1, "r").tolist() == [7]
    assert _policy_versions([], 0, "r").tolist() == []
    with pytest.raises(RuntimeError, match="no weight version for the first tokens"):
        _policy_versions([("5", 1)], 3, "r")
    with pytest.raises(RuntimeError, match="no weight version"):
        _policy_versions([], 2, "r")


@pytest.mark.parametrize("damage", ["sampled id", "rank", "missing entry"])
def test_a_record_of_another_layout_is_refused(damage: str) -> None:
    sampled = [5, 9]
    flat, _, _ = sampled_record(sampled, top_k=2)
    if damage == "sampled id":
        flat.token_ids[3] = 11  # position 1 names another sampled token
    elif damage == "rank":
        flat.ranks[1] = 2  # the top-k of position 0 is not ranked 1..k
    else:
        flat = sampled_record(sampled, top_k=1)[0]  # logprobs=1 instead of 2
    with pytest.raises(RuntimeError, match="not honoured"):
        PendingRequest(top_k=2).complete("r", "stop", sampled, flat, [("0", 0)])


def test_scoring_keeps_the_response_logprobs_and_an_early_abort_returns_nothing() -> None:
    prompt, response = [1, 2, 3], [4, 5]
    all_ids = prompt + response
    flat = Flat()
    flat.add([], [], [])  # position 0 has no log-prob
    for p in range(1, len(all_ids)):
        flat.add([all_ids[p]], [-0.5 * p], [1])
    pending = PendingRequest(top_k=0, scored=(len(prompt), all_ids))
    done = pending.complete("f", "length", [0], Flat(), [("3", 0)], flat)
    assert done.finish_reason == "scored" and done.token_ids.tolist() == response
    assert done.logprobs.tolist() == [-1.5, -2.0] and done.token_policy_versions.tolist() == [3, 3]
    aborted = pending.complete("f", "abort", [], None, [], None)
    assert aborted.finish_reason == "abort" and aborted.token_ids.size == aborted.logprobs.size == 0
    with pytest.raises(RuntimeError, match="expected 4"):
        pending.complete("f", "length", [0], Flat(), [("3", 0)], None)


def assert_same(got: Completion, want: Completion) -> None:
    assert (got.request_id, got.finish_reason) == (want.request_id, want.finish_reason)
    for field_name in ("token_ids", "logprobs", "token_policy_versions", "topk_ids"):
        a, b = getattr(got, field_name), getattr(want, field_name)
        if b is None:
            assert a is None, field_name
        else:
            assert a.dtype == b.dtype and a.flags.c_contiguous, field_name
            np.testing.assert_array_equal(a, b, err_msg=field_name)


def test_a_step_of_requests_converted_together_equals_one_by_one() -> None:
    """Several top-k widths, lengths, a weight load inside one request, a scored request
    and an abort before the first token, in one step's order."""
    records = []
    for i, (sampled, top_k, spans) in enumerate([([5, 9, 9, 2], 3, [("4", 0)]), ([7], 3, [("4", 0)]),
                                                 ([3, 4], 0, [("4", 0)]), ([1, 2, 3, 4, 5], 3, [("4", 0), ("5", 2)]),
                                                 ([], 3, [])]):
        flat = sampled_record(sampled, top_k, seed=i)[0] if sampled else None
        records.append(Finished(f"r{i}", PendingRequest(top_k=top_k), "stop", sampled, flat, spans))
    scored = Flat()
    scored.add([], [], [])
    scored.add([8], [-0.25], [1])
    records.insert(2, Finished("s", PendingRequest(top_k=0, scored=(1, [3, 8])), "length", [0], Flat(), [("4", 0)],
                               scored))
    together = complete_all(records)
    assert [c.request_id for c in together] == [r.request_id for r in records]
    for got, record in zip(together, records):
        assert_same(got, record.pending.complete(record.request_id, record.finish_reason, record.token_ids,
                                                 record.flat, record.version_starts, record.prompt_flat))
    assert together[4].token_policy_versions.tolist() == [4, 4, 5, 5, 5]


def test_a_bad_record_among_good_ones_is_refused_by_name() -> None:
    good = [Finished(f"ok{i}", PendingRequest(top_k=2), "stop", [5, 9], sampled_record([5, 9], 2, seed=i)[0],
                     [("0", 0)]) for i in range(3)]
    bad_rank = sampled_record([5, 9], top_k=2)[0]
    bad_rank.ranks[5] = 1  # position 1's second top-k entry ranked 1 again
    with pytest.raises(RuntimeError, match="'bad' do not hold each sampled token"):
        complete_all([*good[:2], Finished("bad", PendingRequest(top_k=2), "stop", [5, 9], bad_rank, [("0", 0)]),
                      good[2]])
    short = sampled_record([5, 9], top_k=1)[0]  # logprobs=1 instead of 2
    with pytest.raises(RuntimeError, match="'short' without 3 log-probs"):
        complete_all([good[0], Finished("short", PendingRequest(top_k=2), "stop", [5, 9], short, [("0", 0)])])
