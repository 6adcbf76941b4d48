"""msgpack encoding of :data:`asyncopd.types.Message`, with numpy arrays as a
compact extension type (dtype string + raw little-endian bytes), never pickle.

``decode`` raises :class:`MalformedMessage` for anything that is not a valid
message: foreign bytes, unknown tags, wrong field types, broken invariants.
Callers count and drop those; a worker never crashes on them.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

from asyncopd.types import Message, ScoredRollout

__all__ = ["MalformedMessage", "encode", "decode", "encode_batch", "decode_batch"]

_NDARRAY_EXT = 1
_DTYPE_FIELD = 4  # bytes reserved for the numpy dtype string, e.g. b"<i4 "
_ALLOWED_DTYPES = {np.dtype(t).str for t in (np.int32, np.int64, np.float32, np.float64, np.uint8)}


class MalformedMessage(ValueError):
    """Bytes that do not decode into a valid message."""


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.ndim != 1:
            raise TypeError("only 1-d arrays travel on the wire")
        little = obj.astype(obj.dtype.newbyteorder("<"), copy=False)
        return msgspec.msgpack.Ext(_NDARRAY_EXT, little.dtype.str.encode().ljust(_DTYPE_FIELD) + little.tobytes())
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _ext_hook(code: int, data: memoryview) -> Any:
    if code != _NDARRAY_EXT:
        raise TypeError(f"unknown msgpack extension {code}")
    dtype_str = bytes(data[:_DTYPE_FIELD]).strip().decode("ascii", errors="replace")
    if dtype_str not in _ALLOWED_DTYPES:
        raise TypeError(f"array dtype {dtype_str!r} is not allowed")
    dtype = np.dtype(dtype_str)
    payload = data[_DTYPE_FIELD:]
    if len(payload) % dtype.itemsize:
        raise TypeError("array payload is not a whole number of elements")
    return np.frombuffer(payload, dtype=dtype).copy()


def _dec_hook(kind: type, obj: Any) -> Any:
    if kind is np.ndarray and isinstance(obj, np.ndarray):
        return obj
    raise TypeError(f"expected an array, got {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder(Message, ext_hook=_ext_hook, dec_hook=_dec_hook)
_batch_decoder = msgspec.msgpack.Decoder(list[ScoredRollout], ext_hook=_ext_hook, dec_hook=_dec_hook)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError) as exc:
        raise MalformedMessage(str(exc)) from None


def encode_batch(batch: list[ScoredRollout]) -> bytes:
    """A training batch as one msgpack payload (learner rank 0 -> the other learner ranks)."""
    return _encoder.encode(batch)


def decode_batch(data: bytes) -> list[ScoredRollout]:
    try:
        return _batch_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError) as exc:
        raise MalformedMessage(str(exc)) from None
