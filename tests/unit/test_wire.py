"""Wire types: round trips, invariants, and rejection of malformed or foreign bytes."""

import msgspec
import numpy as np
import pytest

from asyncopd.transport.codec import MalformedMessage, decode, encode
from asyncopd.types import ActorStats, Rollout, ScoreAck, ScoredRollout, Shutdown, TensorSpec, WeightUpdate


def make_rollout(n: int = 3, versions=(4, 4, 5), rollout_id: str = "0-1", batch_index: int = 5) -> Rollout:
    return Rollout(
        rollout_id=rollout_id, kind="train", batch_index=batch_index, group_id=2, actor_index=0,
        prompt_ids=np.array([5, 6, 7], np.int32), response_ids=np.arange(n, dtype=np.int32),
        behaviour_logprobs=-np.ones(n, np.float32), token_policy_versions=np.array(versions, np.int32),
        policy_version=min(versions), reward=1.0, finish_reason="stop",
    )


def test_scored_rollout_round_trip_keeps_arrays_exact() -> None:
    rollout = make_rollout()
    scored = ScoredRollout(rollout=rollout, teacher_logprobs=np.array([-0.5, -1.5, -2.5], np.float32),
                           teacher_index=1, score_s=0.01, policy_version=4)
    back = decode(encode(scored))
    assert isinstance(back, ScoredRollout)
    np.testing.assert_array_equal(back.teacher_logprobs, scored.teacher_logprobs)
    np.testing.assert_array_equal(back.rollout.token_policy_versions, [4, 4, 5])
    assert back.rollout.response_ids.dtype == np.int32
    assert back.policy_version == 4


def test_arrays_travel_compactly() -> None:
    rollout = make_rollout(n=1000, versions=[0] * 1000)
    # 1000 int32 ids + 1000 float32 + 1000 int32 versions = 12 kB raw; msgpack ints would be larger.
    assert len(encode(rollout)) < 12_000 + 300


@pytest.mark.parametrize("message", [
    ScoreAck(rollout_id="a", ok=False, policy_version=1, error="boom"),
    WeightUpdate(policy_version=3, buckets=[[TensorSpec("w", (2, 3), "float32")]]),
    Shutdown(policy_version=9, reason="done"),
    ActorStats(actor_index=0, policy_version=1, tokens_generated=10, engine_busy_s=1.0, wall_s=2.0,
               weight_sync_s=0.1, num_retries=0, num_unscored=0, num_rejected_messages=0),
])
def test_control_messages_round_trip(message) -> None:
    assert decode(encode(message)) == message


def test_invariants_hold_on_construction() -> None:
    with pytest.raises(ValueError, match="behaviour_logprobs has 2 entries"):
        Rollout(**{**msgspec.structs.asdict(make_rollout()), "behaviour_logprobs": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="policy_version=5 differs"):
        Rollout(**{**msgspec.structs.asdict(make_rollout()), "policy_version": 5})
    with pytest.raises(ValueError, match="dtype int32"):
        Rollout(**{**msgspec.structs.asdict(make_rollout()), "response_ids": np.arange(3, dtype=np.int64)})


@pytest.mark.parametrize("payload", [
    b"",
    b"\x00\x01garbage",
    msgspec.msgpack.encode({"type": "Rollout", "rollout_id": 1}),
    msgspec.msgpack.encode({"type": "NotAMessage"}),
    msgspec.msgpack.encode([1, 2, 3]),
    msgspec.msgpack.encode(msgspec.msgpack.Ext(7, b"xx")),
])
def test_foreign_or_malformed_bytes_are_rejected(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode(payload)


def test_decoded_message_that_breaks_an_invariant_is_rejected() -> None:
    good = encode(make_rollout())
    # Change the policy_version field's value behind the struct's back.
    raw = msgspec.msgpack.decode(good, ext_hook=lambda code, data: msgspec.msgpack.Ext(code, bytes(data)))
    raw["policy_version"] = 99
    with pytest.raises(MalformedMessage, match="policy_version"):
        decode(msgspec.msgpack.encode(raw))


def test_training_batch_round_trip() -> None:
    from asyncopd.transport.codec import decode_batch, encode_batch

    batch = [ScoredRollout(rollout=make_rollout(rollout_id=f"0-{i}"), teacher_logprobs=np.full(3, -i, np.float32),
                           teacher_index=0, score_s=0.0, policy_version=4) for i in range(3)]
    back = decode_batch(encode_batch(batch))
    assert [s.rollout_id for s in back] == ["0-0", "0-1", "0-2"]
    np.testing.assert_array_equal(back[2].teacher_logprobs, [-2, -2, -2])
    with pytest.raises(MalformedMessage):
        decode_batch(b"\x93\x01")


# ---- top-k distillation fields ---------------------------------------------------------------

def make_topk_pair(n: int = 3, k: int = 2) -> tuple[Rollout, ScoredRollout]:
    student = np.array([[4, 9], [1, 2], [7, 3]], np.int32)[:n, :k]
    rollout = Rollout(**{**msgspec.structs.asdict(make_rollout(n=n, versions=[4] * n)), "student_topk_ids": student})
    ids = np.array([[9, 5, 4, -1], [0, 3, 1, 2], [7, 6, 3, -1]], np.int32)[:n]
    logprobs = np.where(ids >= 0, -np.arange(1, 5, dtype=np.float32), 0).astype(np.float32)
    scored = ScoredRollout(rollout=rollout, teacher_logprobs=np.full(n, -1.0, np.float32), teacher_index=0,
                           score_s=0.0, policy_version=4, topk_ids=ids, topk_logprobs=logprobs)
    return rollout, scored


def test_topk_arrays_round_trip_with_shape_and_dtype() -> None:
    rollout, scored = make_topk_pair()
    back = decode(encode(scored))
    assert back.rollout.student_topk_ids.dtype == np.int32 and back.rollout.student_topk_ids.shape == (3, 2)
    np.testing.assert_array_equal(back.rollout.student_topk_ids, rollout.student_topk_ids)
    assert back.topk_ids.dtype == np.int32 and back.topk_logprobs.dtype == np.float32
    np.testing.assert_array_equal(back.topk_ids, scored.topk_ids)
    np.testing.assert_array_equal(back.topk_logprobs, scored.topk_logprobs)
    assert decode(encode(make_rollout())).student_topk_ids is None  # off: nothing extra
    # Compact: 3 x 2 + 3 x 4 int32 and 3 x 4 float32 = 120 bytes of data, plus per array a
    # 13-byte dtype/shape header, the ext framing and the field name (under 40 bytes).
    assert len(encode(scored)) - len(encode(ScoredRollout(
        rollout=make_rollout(n=3, versions=[4] * 3), teacher_logprobs=scored.teacher_logprobs,
        teacher_index=0, score_s=0.0, policy_version=4))) < 24 + 96 + 3 * 40


def test_empty_response_with_topk_round_trips() -> None:
    empty = {"response_ids": np.zeros(0, np.int32), "behaviour_logprobs": np.zeros(0, np.float32),
             "token_policy_versions": np.zeros(0, np.int32), "student_topk_ids": np.zeros((0, 4), np.int32)}
    rollout = Rollout(**{**msgspec.structs.asdict(make_rollout()), **empty})
    back = decode(encode(rollout))
    assert back.student_topk_ids.shape == (0, 4)


@pytest.mark.parametrize("change, match", [
    ({"student_topk_ids": np.zeros((2, 2), np.int32)}, "student_topk_ids has 2 entries, response_ids has 3"),
    ({"student_topk_ids": np.zeros(3, np.int32)}, "student_topk_ids must be a 2-d array"),
    ({"student_topk_ids": np.zeros((3, 2), np.int64)}, "student_topk_ids must have dtype int32"),
    ({"student_topk_ids": np.zeros((3, 0), np.int32)}, "no columns"),
    ({"student_topk_ids": np.array([[1, 1], [2, 3], [4, 5]], np.int32)}, "repeats an id"),
    ({"student_topk_ids": np.array([[1, -1], [2, 3], [4, 5]], np.int32)}, "negative ids"),
])
def test_inconsistent_student_topk_is_refused(change, match) -> None:
    with pytest.raises(ValueError, match=match):
        Rollout(**{**msgspec.structs.asdict(make_rollout()), **change})


@pytest.mark.parametrize("change, match", [
    ({"topk_logprobs": None}, "both or neither"),
    ({"topk_ids": None}, "both or neither"),
    ({"topk_ids": np.zeros((2, 4), np.int32)}, "topk_ids has 2 entries, response_ids has 3"),
    ({"topk_logprobs": np.zeros((3, 2), np.float32)}, "topk_logprobs has 2 columns, topk_ids has 4"),
    ({"topk_logprobs": np.zeros((3, 4), np.float64)}, "topk_logprobs must have dtype float32"),
    ({"topk_ids": np.zeros((3, 6), np.int32), "topk_logprobs": np.zeros((3, 6), np.float32)},
     "student_topk_ids has 2 .expected 2k"),
    ({"topk_ids": np.array([[1, -1, 2, -1]] * 3, np.int32)}, "only as padding at the end"),
    ({"topk_ids": np.array([[1, 2, 3, -2]] * 3, np.int32)}, "only as padding at the end"),
])
def test_inconsistent_union_topk_is_refused(change, match) -> None:
    _, scored = make_topk_pair()
    with pytest.raises(ValueError, match=match):
        ScoredRollout(**{**msgspec.structs.asdict(scored), **change})


def test_odd_union_width_is_refused_without_student_ids() -> None:
    with pytest.raises(ValueError, match="has 3 columns"):
        ScoredRollout(rollout=make_rollout(n=3, versions=[4] * 3), teacher_logprobs=np.zeros(3, np.float32),
                      teacher_index=0, score_s=0.0, policy_version=4,
                      topk_ids=np.zeros((3, 3), np.int32), topk_logprobs=np.zeros((3, 3), np.float32))


def _raw(message) -> dict:
    """A message as a plain dict, array extensions kept as raw bytes."""
    return msgspec.msgpack.decode(encode(message), ext_hook=lambda code, data: msgspec.msgpack.Ext(code, bytes(data)))


def test_decoded_topk_that_breaks_an_invariant_is_rejected() -> None:
    _, scored = make_topk_pair()
    raw = _raw(scored)
    raw["topk_ids"] = raw["rollout"]["student_topk_ids"]  # [3, 2] ids beside [3, 4] log-probs
    with pytest.raises(MalformedMessage, match="topk_logprobs has 4 columns"):
        decode(msgspec.msgpack.encode(raw))


@pytest.mark.parametrize("corrupt", ["truncated body", "extra byte", "shape mismatch", "no header", "huge ndim",
                                     "huge shape"])
def test_malformed_nd_array_payload_is_rejected(corrupt: str) -> None:
    rollout, _ = make_topk_pair()
    raw = _raw(rollout)
    ext = raw["student_topk_ids"]
    assert ext.code == 2
    data = ext.data  # b"<i4 " + ndim + shape (uint32 LE each) + 24 bytes
    if corrupt == "truncated body":
        data = data[:-1]
    elif corrupt == "extra byte":
        data = data + b"\x00"
    elif corrupt == "shape mismatch":
        data = data[:5] + (2).to_bytes(4, "little") + (3).to_bytes(4, "little") + data[13:]
    elif corrupt == "no header":
        data = data[:4]
    elif corrupt == "huge ndim":
        data = data[:4] + b"\xff" + data[5:]
    else:
        data = data[:5] + (2**32 - 1).to_bytes(4, "little") * 2 + data[13:]
    raw["student_topk_ids"] = msgspec.msgpack.Ext(2, data)
    with pytest.raises(MalformedMessage):
        decode(msgspec.msgpack.encode(raw))


def test_one_dimensional_arrays_keep_their_original_encoding() -> None:
    # Extension code 1, dtype then raw bytes: what every release so far has sent.
    ext = _raw(make_rollout())["response_ids"]
    assert ext.code == 1 and ext.data == b"<i4 " + np.arange(3, dtype="<i4").tobytes()
