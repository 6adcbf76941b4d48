"""Endpoint discovery and start-up barriers over torchrun's rendezvous store.

Every role binds its sockets on an OS-chosen port, publishes the address under a
well-known key, and looks its peers up the same way; nobody types addresses.
The store is the one torchrun already runs (``dist.rendezvous("env://")``).

The store is unauthenticated (any process that reaches it can write keys), so the
one key that acts on its own, the shutdown flag, is signed with the job key
(HMAC-SHA256) when the job has one; a flag without a valid signature is ignored and
logged. Endpoints need no signature: CURVE refuses a peer that does not hold the job
key, so a forged address can only fail a connection, not feed or stop the job.

Restart attempts. Under ``torchrun --max-restarts=N`` the store outlives a
failed world: a restarted world would read the dead one's addresses and barrier
counts and wait forever. Every key therefore lives under
``asyncopd/attempt_<TORCHELASTIC_RESTART_COUNT>/`` (:attr:`Rendezvous.store` is
that prefixed store, so the process groups built on it are scoped too), and every
wait here has a timeout whose error names what it waited for.

This module does not open sockets; it only moves strings (and encoded messages,
such as the teacher's evaluation references) through the store.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from datetime import timedelta

import torch.distributed as dist

from asyncopd.transport import codec
from asyncopd.types import TeacherReferences

__all__ = ["Rendezvous", "ShutdownWatch", "TEACHER_REFERENCES_KEY", "read_teacher_references"]

logger = logging.getLogger(__name__)

_PREFIX = "asyncopd"
TEACHER_REFERENCES_KEY = "eval/teacher_references"
"""Where the rank holding the teacher publishes the encoded TeacherReferences (see asyncopd/references.py)."""


class Rendezvous:
    """The job's key-value store plus this process's rank and the world size."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float, attempt: int = 0, *,
                 signing_key: bytes | None = None) -> None:
        """``signing_key``: the job's secret key, to sign and check the shutdown flag (None: unsigned)."""
        self.attempt = attempt
        """torchrun's restart count (TORCHELASTIC_RESTART_COUNT): 0, then 1 after the first restart."""
        self.store = dist.PrefixStore(f"{_PREFIX}/attempt_{attempt}", store)
        """The store seen through this attempt's prefix (build process groups on it)."""
        self.signing_key = signing_key
        self.num_forged_shutdowns = 0
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = timeout_s
        store.set_timeout(timedelta(seconds=timeout_s))
        self.store.set_timeout(timedelta(seconds=timeout_s))

    @classmethod
    def from_env(cls, timeout_s: float, attempt: int = 0, *, signing_key: bytes | None = None) -> "Rendezvous":
        """Connect to torchrun's store (MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE);
        ``attempt``: torchrun's restart count, read by the launcher."""
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
        return cls(store, rank, world_size, timeout_s, attempt, signing_key=signing_key)

    def publish(self, key: str, value: str) -> None:
        self.store.set(key, value)

    def publish_bytes(self, key: str, value: bytes) -> None:
        self.store.set(key, value)

    def lookup(self, key: str) -> str:
        """The value published under ``key``; waits up to ``timeout_s`` for it."""
        return self.lookup_bytes(key).decode()

    def lookup_bytes(self, key: str) -> bytes:
        """The bytes published under ``key``; waits up to ``timeout_s`` for them."""
        try:
            return self.store.get(key)
        except RuntimeError as exc:  # the store raises on timeout
            raise TimeoutError(
                f"no peer published {key!r} within cluster.startup_timeout_s={self.timeout_s:g}s "
                f"(rank {self.rank}, restart attempt {self.attempt}). A peer may have died during start-up "
                "(see its traceback), or start-up is slow: raise cluster.startup_timeout_s."
            ) from exc

    def announce_shutdown(self, reason: str) -> None:
        """Tell every role the job is over (read by :meth:`shutdown_requested`)."""
        self.store.set("shutdown", f"{self._signature(reason)}:{reason}")

    def _signature(self, reason: str) -> str:
        if self.signing_key is None:
            return "unsigned"
        return hmac.new(self.signing_key, f"{_PREFIX}/attempt_{self.attempt}/shutdown:{reason}".encode(),
                        hashlib.sha256).hexdigest()

    def shutdown_requested(self) -> bool:
        """Whether the learner announced the end of the job (non-blocking); a flag
        without the job key's signature is ignored (counted and logged)."""
        if not self.store.check(["shutdown"]):
            return False
        signature, _, reason = self.store.get("shutdown").decode(errors="replace").partition(":")
        if hmac.compare_digest(signature, self._signature(reason)):
            return True
        self.num_forged_shutdowns += 1
        if self.num_forged_shutdowns & (self.num_forged_shutdowns - 1) == 0:  # 1, 2, 4, ...
            logger.warning("rank %d: ignored a shutdown flag in the rendezvous store without the job key's "
                           "signature (%d so far): someone else wrote it", self.rank, self.num_forged_shutdowns)
        return False

    def barrier(self, name: str) -> None:
        """Block until all ranks reached the barrier ``name`` (used once per name)."""
        key = f"barrier/{name}"
        arrived = self.store.add(key, 1)
        deadline = time.monotonic() + self.timeout_s
        while arrived < self.world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"barrier {name!r}: {arrived}/{self.world_size} ranks arrived within "
                    f"cluster.startup_timeout_s={self.timeout_s:g}s (restart attempt {self.attempt}); "
                    "a peer died or is stuck (see its log), or start-up is slow: raise cluster.startup_timeout_s."
                )
            time.sleep(0.05)
            arrived = self.store.add(key, 0)


def read_teacher_references(rendezvous: Rendezvous) -> TeacherReferences:
    """The evaluation's teacher samples, which the rank holding the teacher (teacher rank
    0, or learner rank 0 with teacher.backend=colocated) publishes before the "connected"
    barrier (call it after that barrier); when it has none, ``skipped_reason`` says why."""
    message = codec.decode(rendezvous.lookup_bytes(TEACHER_REFERENCES_KEY))
    if not isinstance(message, TeacherReferences):
        raise TypeError(f"{TEACHER_REFERENCES_KEY!r} holds a {type(message).__name__}, not TeacherReferences")
    return message


class ShutdownWatch:
    """Polls the store's shutdown flag at most every ``every_s`` seconds (cheap to call
    in a hot loop); true once the learner announced the end of the job."""

    def __init__(self, rendezvous: Rendezvous, every_s: float = 1.0) -> None:
        self.rendezvous = rendezvous
        self.every_s = every_s
        self._last = time.monotonic()

    def __call__(self) -> bool:
        if time.monotonic() - self._last < self.every_s:
            return False
        self._last = time.monotonic()
        if self.rendezvous.shutdown_requested():
            logger.info("rank %d: the learner announced the end of the job", self.rendezvous.rank)
            return True
        return False
