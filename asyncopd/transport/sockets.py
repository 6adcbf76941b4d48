"""ZeroMQ channels that carry :data:`asyncopd.types.Message`.

A :class:`Channel` owns one socket. It encodes on send, decodes on receive, and
drops (and counts) anything that is not a valid message, so a foreign or
corrupted frame never crashes a worker; in a batch, each malformed element counts
as one rejected message and the rest of the batch is delivered. Sockets close with
``linger=0``.

Patterns used by the roles:

- actor ``DEALER`` -> teacher ``ROUTER`` (rollouts out, acknowledgements back;
  a DEALER connected to every teacher spreads rollouts round-robin);
- teacher ``PUSH`` -> learner ``PULL`` (scored rollouts to the buffer);
- learner ``PUSH`` -> each actor's / teacher's ``PULL`` inbox (weight updates,
  shutdown).

Security is process-wide: the launcher calls :func:`configure_security` once per
role process, before any Channel exists, and every Channel then binds as a CURVE
server and connects as a CURVE client (see :mod:`asyncopd.transport.security`), so
call sites never mention it.

This module knows nothing about what the messages mean.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import zmq

from asyncopd.transport.codec import MalformedMessage, decode, encode
from asyncopd.transport.security import CurveSecurity, JobKey
from asyncopd.types import Message

__all__ = ["Channel", "poll", "configure_security"]

logger = logging.getLogger(__name__)

_HWM = 100_000  # messages; rollouts are small and must not be dropped by ZeroMQ

_security: CurveSecurity | None = None


def configure_security(key: JobKey | None) -> CurveSecurity | None:
    """Install this process's socket security: CURVE with the job ``key``, or none.

    Applies to Channels created afterwards. Starts (or stops) the process's ZAP
    authenticator; returns the installed :class:`CurveSecurity` (for ``num_denied``).
    """
    global _security
    if _security is not None:
        _security.close()
    _security = None if key is None else CurveSecurity(key)
    return _security


class Channel:
    """One ZeroMQ socket speaking :data:`Message` frames."""

    def __init__(self, kind: int, *, bind_host: str | None = None, connect: Sequence[str] = (),
                 identity: bytes | None = None) -> None:
        self.kind = kind
        self.socket = zmq.Context.instance().socket(kind)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, _HWM)
        self.socket.setsockopt(zmq.RCVHWM, _HWM)
        if identity is not None:
            self.socket.setsockopt(zmq.IDENTITY, identity)
        self.address: str | None = None
        # libzmq snapshots the socket options at each bind and connect, so one socket
        # may serve bound peers as a CURVE server and reach others as a client.
        if bind_host is not None:
            if _security is not None:
                _security.apply_server(self.socket)
            port = self.socket.bind_to_random_port(f"tcp://{bind_host}")
            self.address = f"tcp://{bind_host}:{port}"
        if connect and _security is not None:
            _security.apply_client(self.socket)
        for address in connect:
            self.socket.connect(address)
        self.num_rejected = 0

    def send(self, message: Message, identity: bytes | None = None) -> None:
        payload = encode(message)
        if self.kind == zmq.ROUTER:
            if identity is None:
                raise ValueError("a ROUTER channel needs the peer identity to send")
            self.socket.send_multipart([identity, payload])
        else:
            self.socket.send(payload)

    def recv(self, timeout_s: float | None = 0.0) -> tuple[bytes | None, Message] | None:
        """The next valid message as (sender identity or None, message).

        Waits up to ``timeout_s`` (None: forever); returns None when nothing valid
        arrived in time. Invalid frames, and the invalid elements of a batch, are
        counted in ``num_rejected`` and skipped.
        """
        timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        while self.socket.poll(timeout_ms):
            frames = self.socket.recv_multipart()
            identity = None
            if self.kind == zmq.ROUTER:
                if len(frames) != 2:
                    self._reject(f"{len(frames)} frames on a ROUTER socket")
                    continue
                identity, payload = frames
            elif len(frames) != 1:
                self._reject(f"{len(frames)} frames")
                continue
            else:
                payload = frames[0]
            problems: list[str] = []
            try:
                message = decode(payload, problems)
            except MalformedMessage as exc:
                self._reject(str(exc))
            else:
                for problem in problems:  # a batch's malformed elements: dropped, each counted
                    self._reject(problem)
                return identity, message
            timeout_ms = 0  # a rejected frame does not restart the wait
        return None

    def _reject(self, why: str) -> None:
        self.num_rejected += 1
        logger.warning("rejected a malformed or foreign message (%d so far): %s", self.num_rejected, why[:200])

    def close(self, linger_s: float = 0.0) -> None:
        """Close the socket; ``linger_s`` > 0 first gives queued messages that long to leave."""
        self.socket.close(linger=int(linger_s * 1000))


def poll(channels: Sequence[Channel], timeout_s: float) -> list[Channel]:
    """The channels with a frame waiting, after at most ``timeout_s``."""
    poller = zmq.Poller()
    for channel in channels:
        poller.register(channel.socket, zmq.POLLIN)
    ready = dict(poller.poll(int(timeout_s * 1000)))
    return [c for c in channels if c.socket in ready]
