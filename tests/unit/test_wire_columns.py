"""The columnar wire form of RolloutBatch / ScoredBatch: exact round trips of every field
(optional arrays mixed, empty responses, several widths in one batch), the same
invariants as the per-element constructors (a broken element is dropped alone, with the
constructor's reason), and inconsistent columns rejecting the frame."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from asyncopd.transport import codec, columns
from asyncopd.transport.codec import MalformedMessage, decode, encode
from asyncopd.types import Rollout, RolloutBatch, ScoredBatch, ScoredRollout, build_checked

_ENCODER = msgspec.msgpack.Encoder(enc_hook=codec._enc_hook)


def rollout(i: int, n: int = 3, k: int | None = 2, version: int = 4, **change) -> Rollout:
    fields = dict(rollout_id=f"0-{i}", kind="train", batch_index=5, group_id=i, actor_index=1,
                  prompt_ids=np.arange(2 + i, dtype=np.int32), response_ids=np.arange(n, dtype=np.int32) + i,
                  behaviour_logprobs=-np.arange(n, dtype=np.float32) / 7, token_policy_versions=np.full(n, version,
                                                                                                        np.int32),
                  policy_version=version, reward=0.25 * i, finish_reason="length" if i % 2 else "stop",
                  student_topk_ids=None if k is None else (np.arange(n * k, dtype=np.int32).reshape(n, k) + 10 * i),
                  slot_id=None if i % 3 else f"0-{i + 100}")
    return Rollout(**{**fields, **change})


def scored(r: Rollout, width: int | None = None, **change) -> ScoredRollout:
    n = r.response_ids.shape[0]
    if width is None and r.student_topk_ids is not None:
        width = 2 * r.student_topk_ids.shape[1]
    ids = logprobs = None
    if width:
        ids = np.full((n, width), -1, np.int32)
        ids[:, : width // 2] = np.arange(width // 2, dtype=np.int32) + 1000
        logprobs = np.where(ids >= 0, -0.5, 0.0).astype(np.float32)
    fields = dict(rollout=r, teacher_logprobs=np.full(n, -0.125, np.float32), teacher_index=2, score_s=0.003,
                  policy_version=r.policy_version, topk_ids=ids, topk_logprobs=logprobs)
    return ScoredRollout(**{**fields, **change})


def same(a, b) -> bool:
    """Field for field equal (arrays by value, dtype and shape): their row-form encodings match."""
    return _ENCODER.encode(a) == _ENCODER.encode(b)


MIXED = [rollout(0), rollout(1, n=0), rollout(2, k=None), rollout(3, k=3, version=2), rollout(4, n=5, k=2)]


def test_batches_travel_in_columns_and_round_trip_every_field() -> None:
    batch = RolloutBatch.of(MIXED)
    assert msgspec.msgpack.decode(encode(batch), ext_hook=lambda c, d: None)["type"] == "RolloutColumns"
    back = decode(encode(batch))
    assert isinstance(back, RolloutBatch) and back.policy_version == 2
    assert all(same(a, b) for a, b in zip(back.rollouts, batch.rollouts, strict=True))

    batch = ScoredBatch.of([scored(MIXED[0]), scored(MIXED[1]), scored(MIXED[2]), scored(MIXED[3], width=0),
                            scored(MIXED[4]), scored(rollout(5, k=None), width=4)])
    assert msgspec.msgpack.decode(encode(batch), ext_hook=lambda c, d: None)["type"] == "ScoredColumns"
    back = decode(encode(batch))
    assert isinstance(back, ScoredBatch) and back.policy_version == 2
    assert all(same(a, b) for a, b in zip(back.scored, batch.scored, strict=True))
    assert back.scored[3].topk_ids is None and back.scored[2].rollout.student_topk_ids is None
    assert back.scored[4].topk_ids.shape == (5, 4) and back.scored[1].topk_ids.shape == (0, 4)
    assert decode(encode(ScoredBatch.of([]))) == ScoredBatch(policy_version=0, scored=[])


def test_a_batch_of_fewer_than_four_goes_element_by_element() -> None:
    for size, form in ((3, "ScoredBatch"), (4, "ScoredColumns")):
        batch = ScoredBatch.of([scored(rollout(i)) for i in range(size)])
        assert msgspec.msgpack.decode(encode(batch), ext_hook=lambda c, d: None)["type"] == form
        assert all(same(a, b) for a, b in zip(decode(encode(batch)).scored, batch.scored, strict=True))


def test_decoded_elements_are_separate_writable_views() -> None:
    back = decode(encode(ScoredBatch.of([scored(rollout(i)) for i in range(4)])))
    back.scored[1].topk_logprobs[...] = 7.0
    back.scored[1].rollout.response_ids[...] = 9
    assert (back.scored[0].topk_logprobs != 7.0).all() and (back.scored[2].topk_logprobs != 7.0).all()
    np.testing.assert_array_equal(back.scored[2].rollout.response_ids, [2, 3, 4])


# Each element fault the columns can carry, built behind the constructor's back, and the
# constructor's own message for it: the columnar decoder must drop that element alone.
ROLLOUT_FAULTS = [
    ({"policy_version": 3}, "differs from min.token_policy_versions.=4"),
    ({"prompt_ids": np.zeros(0, np.int32)}, "prompt_ids is empty"),
    ({"student_topk_ids": np.array([[1, 1], [2, 3], [4, 5]], np.int32)}, "repeats an id"),
    ({"student_topk_ids": np.array([[1, -1], [2, 3], [4, 5]], np.int32)}, "negative ids"),
]


@pytest.mark.parametrize("change, match", ROLLOUT_FAULTS)
def test_a_malformed_rollout_in_columns_is_dropped_alone(change, match) -> None:
    with pytest.raises(ValueError, match=match):  # the constructor refuses it...
        rollout(1, **change)
    good = [rollout(i) for i in range(4)]
    elements = [good[0], build_checked(Rollout, {**msgspec.structs.asdict(good[1]), **change}), *good[2:]]
    problems: list[str] = []
    data = encode(RolloutBatch(policy_version=min(r.policy_version for r in elements), rollouts=elements))
    assert msgspec.msgpack.decode(data, ext_hook=lambda c, d: None)["type"] == "RolloutColumns"
    back = decode(data, problems)
    assert [r.rollout_id for r in back.rollouts] == ["0-0", "0-2", "0-3"]  # ...and so do the columns, alone
    assert len(problems) == 1 and problems[0].startswith("RolloutBatch.rollouts[1] dropped: ")
    assert pytest.importorskip("re").search(match, problems[0])


SCORED_FAULTS = [
    ({"policy_version": 3}, "policy_version differs from the rollout's"),
    ({"topk_ids": np.array([[1, -1, 2, -1]] * 3, np.int32)}, "only as padding at the end"),
    ({"topk_ids": np.array([[1, 2, 3, -2]] * 3, np.int32)}, "only as padding at the end"),
    ({"topk_ids": np.zeros((3, 6), np.int32), "topk_logprobs": np.zeros((3, 6), np.float32)},
     "student_topk_ids has 2 .expected 2k"),
    ({"rollout": rollout(1, k=None), "topk_ids": np.zeros((3, 3), np.int32),
      "topk_logprobs": np.zeros((3, 3), np.float32)}, "has 3 columns"),
]


@pytest.mark.parametrize("change, match", SCORED_FAULTS)
def test_a_malformed_scored_rollout_in_columns_is_dropped_alone(change, match) -> None:
    good = [scored(rollout(i)) for i in range(4)]
    with pytest.raises(ValueError, match=match):
        ScoredRollout(**{**msgspec.structs.asdict(good[2]), **change})
    elements = [*good[:2], build_checked(ScoredRollout, {**msgspec.structs.asdict(good[2]), **change}), good[3]]
    problems: list[str] = []
    data = encode(ScoredBatch(policy_version=3 if "policy_version" in change else 4, scored=elements))
    assert msgspec.msgpack.decode(data, ext_hook=lambda c, d: None)["type"] == "ScoredColumns"
    back = decode(data, problems)
    assert [s.rollout_id for s in back.scored] == ["0-0", "0-1", "0-3"]
    assert len(problems) == 1 and problems[0].startswith("ScoredBatch.scored[2] dropped: ")
    assert pytest.importorskip("re").search(match, problems[0])
    assert back.policy_version == 4


def test_an_unknown_kind_and_several_faults_are_each_counted_once() -> None:
    wire = columns.scored_columns(ScoredBatch.of([scored(rollout(i)) for i in range(4)]))
    wire.rollouts.kind[0] = "bogus"
    wire.rollouts.policy_versions[0] = 1  # a second fault of element 0: still one problem
    wire.rollouts.student_topk_ids[0] = -3  # element 0's first student id
    wire.topk_ids[-1] = -7  # element 3's last union entry
    problems: list[str] = []
    back = decode(_ENCODER.encode(wire), problems)
    assert [s.rollout_id for s in back.scored] == ["0-1", "0-2"]
    assert [p.split(" dropped")[0] for p in problems] == ["ScoredBatch.scored[0]", "ScoredBatch.scored[3]"]
    assert "kind 'bogus'" in problems[0] or "policy_version=1" in problems[0] or "negative" in problems[0]


@pytest.mark.parametrize("breakage", [
    lambda c: c.prompt_lens.__setitem__(0, 3),  # lengths no longer add up to the column
    lambda c: c.response_lens.__setitem__(1, -1),
    lambda c: c.kind.pop(),  # one list shorter than the others
    lambda c: setattr(c, "behaviour_logprobs", c.behaviour_logprobs.astype(np.float64)),
    lambda c: setattr(c, "student_topk_ids", c.student_topk_ids.reshape(-1, 2)),  # not 1-d
    lambda c: c.student_k.__setitem__(2, 3),
])
def test_inconsistent_columns_reject_the_frame(breakage) -> None:
    wire = columns.rollout_columns(RolloutBatch.of([rollout(i) for i in range(3)]))  # columns at any size
    breakage(wire)
    with pytest.raises(MalformedMessage):
        decode(_ENCODER.encode(wire))
    scored_wire = columns.scored_columns(ScoredBatch.of([scored(rollout(i)) for i in range(3)]))
    scored_wire.topk_width[1] = 2
    with pytest.raises(MalformedMessage, match="column topk_ids"):
        decode(_ENCODER.encode(scored_wire))


def test_build_checked_builds_only_the_columnar_elements() -> None:
    with pytest.raises(TypeError, match="not RolloutBatch"):
        build_checked(RolloutBatch, {})
    r = build_checked(Rollout, msgspec.structs.asdict(rollout(7)))
    assert same(r, rollout(7)) and r.slot == "0-7"
