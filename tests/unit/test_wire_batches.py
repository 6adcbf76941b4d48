"""Batched wire messages: round trips, the batch invariant, and element-wise rejection
(a malformed element is dropped and counted, its neighbours are delivered), through
the codec and through a real Channel; the array encoding's fast and slow paths."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import zmq

from asyncopd.transport import codec
from asyncopd.transport.codec import MalformedMessage, decode, encode
from asyncopd.transport.sockets import Channel
from asyncopd.types import Rollout, RolloutBatch, ScoreAck, ScoreAckBatch, ScoredBatch, ScoredRollout


def make_rollout(i: int, version: int = 4, n: int = 3) -> Rollout:
    return Rollout(rollout_id=f"0-{i}", kind="train", batch_index=5, group_id=i, actor_index=0,
                   prompt_ids=np.array([5, 6, 7], np.int32), response_ids=np.arange(n, dtype=np.int32) + i,
                   behaviour_logprobs=-np.ones(n, np.float32), token_policy_versions=np.full(n, version, np.int32),
                   policy_version=version, reward=1.0, finish_reason="stop",
                   student_topk_ids=np.arange(2 * n, dtype=np.int32).reshape(n, 2))


def make_scored(i: int, version: int = 4) -> ScoredRollout:
    r = make_rollout(i, version)
    ids = np.concatenate([r.student_topk_ids, np.full((3, 2), -1, np.int32)], axis=1)
    return ScoredRollout(rollout=r, teacher_logprobs=np.full(3, -0.5 * i, np.float32), teacher_index=1,
                         score_s=0.01, policy_version=version, topk_ids=ids,
                         topk_logprobs=np.where(ids >= 0, -1.0, 0.0).astype(np.float32))


_ROWS = msgspec.msgpack.Encoder(enc_hook=codec._enc_hook)
"""Batches element by element, as peers sent them before the columnar form (still accepted)."""


def raw(message) -> dict:
    """The message in its element-by-element form as plain msgpack data (arrays left as
    Ext), to break behind its back."""
    return msgspec.msgpack.decode(_ROWS.encode(message),
                                  ext_hook=lambda code, data: msgspec.msgpack.Ext(code, bytes(data)))


def test_batches_round_trip_with_the_oldest_policy_version() -> None:
    rollouts = RolloutBatch.of([make_rollout(0, 4), make_rollout(1, 2), make_rollout(2, 3)])
    back = decode(encode(rollouts))
    assert isinstance(back, RolloutBatch) and back.policy_version == 2
    assert [r.rollout_id for r in back.rollouts] == ["0-0", "0-1", "0-2"]
    np.testing.assert_array_equal(back.rollouts[2].response_ids, [2, 3, 4])
    assert back.rollouts[1].student_topk_ids.shape == (3, 2)

    scored = ScoredBatch.of([make_scored(i) for i in range(3)])
    back = decode(encode(scored))
    assert isinstance(back, ScoredBatch) and [s.rollout_id for s in back.scored] == ["0-0", "0-1", "0-2"]
    np.testing.assert_array_equal(back.scored[2].teacher_logprobs, [-1.0, -1.0, -1.0])
    np.testing.assert_array_equal(back.scored[0].topk_ids, scored.scored[0].topk_ids)

    acks = ScoreAckBatch.of([ScoreAck(rollout_id="a", ok=True, policy_version=3),
                             ScoreAck(rollout_id="b", ok=False, policy_version=1, error="boom")])
    assert decode(encode(acks)) == acks and acks.policy_version == 1
    assert decode(encode(RolloutBatch.of([]))) == RolloutBatch(policy_version=0, rollouts=[])


def test_a_batch_version_must_be_its_elements_minimum() -> None:
    with pytest.raises(ValueError, match=r"policy_version=5 differs from its elements' minimum 4 \(build .*of\(\)"):
        RolloutBatch(policy_version=5, rollouts=[make_rollout(0, 4)])


@pytest.mark.parametrize("breakage", [
    lambda e: e.update(policy_version=99),  # an invariant (min of token versions)
    lambda e: e.update(response_ids=msgspec.msgpack.Ext(1, b"<i8 " + bytes(8))),  # wrong dtype
    lambda e: e.update(behaviour_logprobs=msgspec.msgpack.Ext(1, b"<f4 " + bytes(3))),  # torn array payload
    lambda e: e.update(student_topk_ids=msgspec.msgpack.Ext(9, b"xx")),  # unknown extension
    lambda e: e.pop("rollout_id"),  # a missing field
    lambda e: e.update(type="Heartbeat"),  # a foreign tag
])
def test_a_malformed_rollout_is_dropped_and_counted_its_neighbours_kept(breakage) -> None:
    wire = raw(RolloutBatch.of([make_rollout(i) for i in range(3)]))
    breakage(wire["rollouts"][1])
    problems: list[str] = []
    back = decode(msgspec.msgpack.encode(wire), problems)
    assert isinstance(back, RolloutBatch) and [r.rollout_id for r in back.rollouts] == ["0-0", "0-2"]
    assert len(problems) == 1 and problems[0].startswith("RolloutBatch.rollouts[1] dropped: ")


def test_a_malformed_scored_rollout_or_ack_is_dropped_alone() -> None:
    wire = raw(ScoredBatch.of([make_scored(i) for i in range(3)]))
    wire["scored"][0]["teacher_logprobs"] = msgspec.msgpack.Ext(1, b"<f4 " + bytes(8))  # 2 entries, 3 tokens
    wire["scored"][2] = "not a struct"
    problems: list[str] = []
    back = decode(msgspec.msgpack.encode(wire), problems)
    assert [s.rollout_id for s in back.scored] == ["0-1"]
    assert "ScoredBatch.scored[0]" in problems[0] and "teacher_logprobs has 2 entries" in problems[0]
    assert "ScoredBatch.scored[2]" in problems[1] and len(problems) == 2

    wire = raw(ScoreAckBatch.of([ScoreAck(rollout_id=r, ok=True, policy_version=v) for r, v in (("a", 3), ("b", 1))]))
    wire["acks"][1]["ok"] = "yes"
    problems = []
    back = decode(msgspec.msgpack.encode(wire), problems)
    assert [a.rollout_id for a in back.acks] == ["a"] and len(problems) == 1
    assert back.policy_version == 3  # rebuilt from what was kept


def test_only_a_broken_envelope_rejects_the_whole_batch() -> None:
    for change in ({"rollouts": "nope"}, {"policy_version": "old"}):
        wire = {**raw(RolloutBatch.of([make_rollout(0)])), **change}
        with pytest.raises(MalformedMessage):
            decode(msgspec.msgpack.encode(wire))
    with pytest.raises(MalformedMessage):
        decode(encode(RolloutBatch.of([make_rollout(0)]))[:-5])  # truncated frame


def test_a_channel_counts_each_dropped_element_and_delivers_the_rest() -> None:
    pull = Channel(zmq.PULL, bind_host="127.0.0.1")
    push = Channel(zmq.PUSH, connect=[pull.address])
    try:
        wire = raw(ScoredBatch.of([make_scored(i) for i in range(4)]))
        wire["scored"][1]["policy_version"] = 7
        wire["scored"][3]["rollout"]["prompt_ids"] = msgspec.msgpack.Ext(1, b"<i4 ")  # empty prompt
        push.socket.send(msgspec.msgpack.encode(wire))
        push.send(ScoredBatch.of([make_scored(9)]))
        first = pull.recv(timeout_s=5.0)
        assert first is not None and [s.rollout_id for s in first[1].scored] == ["0-0", "0-2"]
        assert pull.num_rejected == 2
        second = pull.recv(timeout_s=5.0)
        assert second is not None and [s.rollout_id for s in second[1].scored] == ["0-9"]
        assert pull.num_rejected == 2
    finally:
        push.close()
        pull.close()


# ---- the array encoding ----------------------------------------------------------------------

@pytest.mark.parametrize("array", [
    np.arange(5, dtype=np.int32),
    np.arange(5, dtype=">i4"),  # foreign byte order: swapped on the way out
    np.arange(12, dtype=np.float64).reshape(3, 4)[:, ::2],  # 2-d, not contiguous
    np.zeros(0, np.float32),
    np.arange(4, dtype=np.uint8),
])
def test_arrays_round_trip_exactly_and_writable(array: np.ndarray) -> None:
    from asyncopd.transport.codec import decode_value, encode_value

    back = decode_value(encode_value(array), np.ndarray)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype.newbyteorder("=") and back.shape == array.shape
    assert back.dtype.isnative and back.flags.writeable  # callers may write into what they received
    back[...] = 0


def test_array_encoding_stays_the_released_format() -> None:
    """Older peers read the new encoder's output and vice versa (byte for byte)."""
    ext = msgspec.msgpack.decode(encode(make_rollout(0)), ext_hook=lambda c, d: (c, bytes(d)))["response_ids"]
    assert ext == (1, b"<i4 " + np.array([0, 1, 2], "<i4").tobytes())
    ext = msgspec.msgpack.decode(encode(make_rollout(0)), ext_hook=lambda c, d: (c, bytes(d)))["student_topk_ids"]
    assert ext == (2, b"<i4 " + bytes([2]) + np.array([3, 2], "<u4").tobytes() + np.arange(6, dtype="<i4").tobytes())

