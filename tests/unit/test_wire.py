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
