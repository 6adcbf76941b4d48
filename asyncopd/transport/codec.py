"""msgpack encoding of :data:`asyncopd.types.Message`, with numpy arrays as a
compact extension type (dtype string + shape + raw little-endian bytes), never pickle.

Two extension codes: 1 holds a 1-d array (dtype + bytes; the length follows from the
byte count, the format since the first release); 2 holds an array of any other
rank (dtype + ndim + shape + bytes, C order), e.g. the [n, k] top-k arrays.

``decode`` raises :class:`MalformedMessage` for anything that is not a valid
message: foreign bytes, unknown tags, wrong field types, broken invariants,
array payloads whose size disagrees with their dtype and shape.
Callers count and drop those; a worker never crashes on them.

Batches. The two hot ones, :class:`~asyncopd.types.RolloutBatch` and ``ScoredBatch``,
are sent in columns (:mod:`asyncopd.transport.columns`: one array per field for the whole
batch, every invariant checked once per batch) from ``_COLUMNS_FROM`` elements on, and
element by element below (a frame of one or two is cheaper so). ``ScoreAckBatch``, and
either batch in its element-by-element form (also what peers before the columns sent), is decoded
element by element: the envelope is read with each element left as raw msgpack, then
every element is decoded and validated on its own. Either way a malformed element is
dropped and reported (``problems``), its neighbours are kept, and the batch's
``policy_version`` is recomputed from what was kept; only a broken envelope (or
inconsistent columns) rejects the whole frame.

Cost. Arrays are small and many (a demo rollout is ~4 tokens, five arrays), so the
hooks' per-call overhead, not the bytes, is what an array costs: a little-endian
dtype takes one dict lookup and one copy each way (n-d shapes with a cached
``struct.Struct``), only a foreign byte order is swapped first, and decoded arrays
are typed by msgspec itself (no ``dec_hook`` call per array).
``bench/wire_cost.py`` measures it.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Union

import msgspec
import numpy as np

from asyncopd import types
from asyncopd.transport import columns
from asyncopd.types import Message, ScoredRollout

__all__ = ["MalformedMessage", "encode", "decode", "encode_batch", "decode_batch", "encode_value", "decode_value"]

_ARRAY_1D_EXT = 1  # dtype (4 bytes) + raw bytes
_ARRAY_ND_EXT = 2  # dtype (4 bytes) + ndim (1 byte) + shape (ndim x uint32 LE) + raw bytes
_DTYPE_FIELD = 4  # bytes reserved for the numpy dtype string, e.g. b"<i4 "
_MAX_NDIM = 8
_ALLOWED_DTYPES = {np.dtype(t).newbyteorder("<").str for t in (np.int32, np.int64, np.float32, np.float64, np.uint8)}
# The wire's dtype field -> dtype, looked up per array (np.dtype(str) costs more than the copy).
_DTYPES = {name.encode().ljust(_DTYPE_FIELD): np.dtype(name) for name in _ALLOWED_DTYPES}
# dtype -> its wire field, for the dtypes that need no byte swap (the encoder's fast path).
_HEADERS = {dtype: field for field, dtype in _DTYPES.items()}
# ndim -> the packed (ndim, shape) header of the n-d extension.
_SHAPES = [struct.Struct(f"<B{ndim}I") for ndim in range(_MAX_NDIM + 1)]


class MalformedMessage(ValueError):
    """Bytes that do not decode into a valid message."""


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        ndim = obj.ndim
        if ndim > _MAX_NDIM:
            raise TypeError(f"arrays of more than {_MAX_NDIM} dimensions do not travel on the wire")
        header = _HEADERS.get(obj.dtype)
        if header is None:  # not little-endian already: swap (a copy), then as usual
            obj = obj.astype(obj.dtype.newbyteorder("<"))
            header = obj.dtype.str.encode().ljust(_DTYPE_FIELD)
        if ndim == 1:
            return msgspec.msgpack.Ext(_ARRAY_1D_EXT, header + obj.tobytes())
        return msgspec.msgpack.Ext(_ARRAY_ND_EXT, header + _SHAPES[ndim].pack(ndim, *obj.shape) + obj.tobytes())
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: memoryview) -> Any:
    dtype = _DTYPES.get(data[:_DTYPE_FIELD].tobytes())
    if code == _ARRAY_1D_EXT and dtype is not None:
        body = data[_DTYPE_FIELD:]
        if len(body) % dtype.itemsize:
            raise TypeError("array payload is not a whole number of elements")
        return np.frombuffer(bytearray(body), dtype=dtype)  # one copy, writable
    if code not in (_ARRAY_1D_EXT, _ARRAY_ND_EXT):
        raise TypeError(f"unknown msgpack extension {code}")
    if dtype is None:
        shown = bytes(data[:_DTYPE_FIELD]).strip().decode("ascii", errors="replace")
        raise TypeError(f"array dtype {shown!r} is not allowed")
    payload = data[_DTYPE_FIELD:]
    ndim = payload[0] if len(payload) else -1
    if not 0 <= ndim <= _MAX_NDIM or len(payload) < 1 + 4 * ndim:
        raise TypeError("array header is truncated or names too many dimensions")
    shape = _SHAPES[ndim].unpack_from(payload)[1:]
    body = payload[1 + 4 * ndim:]
    if len(body) != dtype.itemsize * math.prod(shape):  # Python ints: no overflow, no numpy reduce (~20 us)
        raise TypeError(f"array payload of {len(body)} bytes does not hold {dtype} of shape {shape}")
    return np.frombuffer(bytearray(body), dtype=dtype).reshape(shape)


# ---- batches: the envelope with raw elements, then each element on its own ----------------------

class _RolloutBatchWire(msgspec.Struct, tag="RolloutBatch", kw_only=True):
    policy_version: int
    rollouts: list[msgspec.Raw]


class _ScoreAckBatchWire(msgspec.Struct, tag="ScoreAckBatch", kw_only=True):
    policy_version: int
    acks: list[msgspec.Raw]


class _ScoredBatchWire(msgspec.Struct, tag="ScoredBatch", kw_only=True):
    policy_version: int
    scored: list[msgspec.Raw]


_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError)
_BATCHES: dict[type, tuple[type, str, msgspec.msgpack.Decoder]] = {
    wire: (batch, field, msgspec.msgpack.Decoder(element, ext_hook=_ext_hook))
    for wire, batch, field, element in (
        (_RolloutBatchWire, types.RolloutBatch, "rollouts", types.Rollout),
        (_ScoreAckBatchWire, types.ScoreAckBatch, "acks", types.ScoreAck),
        (_ScoredBatchWire, types.ScoredBatch, "scored", types.ScoredRollout),
    )
}
_WIRE_OF = {batch: wire for wire, (batch, _, _) in _BATCHES.items()}
_COLUMNS = {columns.RolloutColumns: columns.rollouts_of, columns.ScoredColumns: columns.scored_of}
_TO_COLUMNS = {types.RolloutBatch: (columns.rollout_columns, "rollouts"),
               types.ScoredBatch: (columns.scored_columns, "scored")}
_COLUMNS_FROM = 4
"""Batches of fewer elements go element by element: the columns cost ~50 us more per frame
and ~20 us less per element (bench/wire_cost.py, frames), even from ~3 elements."""
_WireMessage = Union[(*(_WIRE_OF.get(t, t) for t in Message.__args__), *_COLUMNS)]  # type: ignore[misc]

_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder(_WireMessage, ext_hook=_ext_hook)
_batch_decoder = msgspec.msgpack.Decoder(list[ScoredRollout], ext_hook=_ext_hook)


def encode(message: Message) -> bytes:
    to_columns = _TO_COLUMNS.get(type(message))
    if to_columns is not None and len(getattr(message, to_columns[1])) >= _COLUMNS_FROM:
        return _encoder.encode(to_columns[0](message))
    return _encoder.encode(message)


def decode(data: bytes, problems: list[str] | None = None) -> Message:
    """The message in ``data``; raises :class:`MalformedMessage` if it is none.

    A batch comes back without its malformed elements; each one dropped appends a line
    naming its position and fault to ``problems`` (pass a list to count them)."""
    try:
        message = _decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise MalformedMessage(str(exc)) from None
    from_columns = _COLUMNS.get(type(message))
    if from_columns is not None:
        try:
            return from_columns(message, problems)
        except ValueError as exc:  # the columns disagree with each other: the envelope is broken
            raise MalformedMessage(str(exc)) from None
    unpack = _BATCHES.get(type(message))
    if unpack is None:
        return message
    batch, field, element_decoder = unpack
    elements = []
    for i, raw in enumerate(getattr(message, field)):
        try:
            elements.append(element_decoder.decode(raw))
        except _DECODE_ERRORS as exc:
            if problems is not None:
                problems.append(f"{batch.__name__}.{field}[{i}] dropped: {exc}")
    return batch.of(elements)


def encode_batch(batch: list[ScoredRollout]) -> bytes:
    """A training batch as one msgpack payload (learner rank 0 -> the other learner ranks)."""
    return _encoder.encode(batch)


def decode_batch(data: bytes) -> list[ScoredRollout]:
    try:
        return _batch_decoder.decode(data)
    except _DECODE_ERRORS as exc:
        raise MalformedMessage(str(exc)) from None


def encode_value(value: Any) -> bytes:
    """Any msgpack-able value (structs, lists, numpy arrays) in the wire encoding; for
    private pipes such as a teacher rank's scorer process (never pickle)."""
    return _encoder.encode(value)


def decode_value(data: bytes, kind: Any) -> Any:
    """The inverse of :func:`encode_value`, validated as ``kind``."""
    try:
        return msgspec.msgpack.decode(data, type=kind, ext_hook=_ext_hook)
    except _DECODE_ERRORS as exc:
        raise MalformedMessage(str(exc)) from None
