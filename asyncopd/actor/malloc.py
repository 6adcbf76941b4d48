"""glibc malloc settings of an engine process (the actor's vLLM, a vLLM teacher).

Two measures against the heap growth that a long soak of the demo showed in the
actor (issue 10, bench/results/soak.txt), both applied by the launcher before the
engine is built (asyncopd/launch.py):

- :func:`fix_malloc_mmap_threshold` pins the size from which blocks are mmapped
  (``actor.malloc_mmap_threshold``), so that large freed blocks go back to the OS;
- :func:`start_malloc_trimmer` starts a daemon thread that calls
  ``malloc_trim(0)`` every ``actor.malloc_trim_every_s`` seconds: glibc then
  ``madvise``s away the whole pages of every free chunk inside its arenas, the
  free space that otherwise stays resident and grew by tens of MB an hour.

Nothing here changes what the engine computes; where the C library is not glibc
both leave malloc as it is. This module does not touch ``os.environ``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from pathlib import Path

__all__ = ["MallocTrimmer", "fix_malloc_mmap_threshold", "start_malloc_trimmer"]

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def _libc_function(name: str):
    """The C library's function ``name``, or None (not glibc, or no such function)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def fix_malloc_mmap_threshold(threshold: int | None) -> bool:
    """Pin glibc's mmap threshold at ``threshold`` bytes (``actor.malloc_mmap_threshold``).

    glibc starts it at 128 KiB and raises it, up to 32 MiB, each time a large mmapped
    block is freed; from then on blocks of that size come from the heap arena, and the
    engine's varying kernel and activation buffers leave it holes that are never given
    back: the actor's RSS rose ~80 MB/h as free space inside the arena
    (bench/results/soak.txt). A pinned threshold keeps large blocks mmapped (returned on
    free). Returns whether it was applied: None, or a C library without ``mallopt``
    (not glibc), leaves malloc as it is.
    """
    if threshold is None:
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        logger.info("actor.malloc_mmap_threshold=%d ignored: this C library has no mallopt", threshold)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MallocTrimmer:
    """Calls ``malloc_trim(0)`` every ``every_s`` seconds in a daemon thread and keeps
    its cost: ``num_calls``, ``total_s``, ``max_s`` (seconds inside the call, during
    which glibc holds each arena's lock in turn) and ``released_mb`` (RSS before minus
    after, summed). Logs a summary every ``log_every_s`` seconds."""

    def __init__(self, every_s: float, trim, *, log_every_s: float = 300.0) -> None:
        if not every_s > 0:
            raise ValueError(f"every_s={every_s}: must be > 0. Fix: pass the seconds between trims.")
        self.every_s, self.log_every_s, self._trim = every_s, log_every_s, trim
        self.num_calls, self.total_s, self.max_s, self.released_mb = 0, 0.0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asyncopd-malloc-trim", daemon=True)

    def trim_once(self) -> float:
        """One ``malloc_trim(0)``; returns the MB of RSS it gave back."""
        before = _rss_mb()
        start = time.perf_counter()
        self._trim(0)
        took = time.perf_counter() - start
        released = before - _rss_mb()
        self.num_calls += 1
        self.total_s += took
        self.max_s = max(self.max_s, took)
        self.released_mb += released
        return released

    def _run(self) -> None:
        last_log, calls_then, total_then = time.monotonic(), 0, 0.0
        while not self._stop.wait(self.every_s):
            self.trim_once()
            if time.monotonic() - last_log >= self.log_every_s:
                calls = self.num_calls - calls_then
                logger.info("malloc_trim: %d calls in %.0f s, %.1f ms a call (max so far %.1f ms), %.1f MB given "
                            "back in all", calls, time.monotonic() - last_log,
                            1000 * (self.total_s - total_then) / max(calls, 1), 1000 * self.max_s, self.released_mb)
                last_log, calls_then, total_then = time.monotonic(), self.num_calls, self.total_s

    def start(self) -> MallocTrimmer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start_malloc_trimmer(every_s: float | None) -> MallocTrimmer | None:
    """Start trimming every ``every_s`` seconds (``actor.malloc_trim_every_s``); None
    (not started) for None or a C library without ``malloc_trim`` (not glibc)."""
    if every_s is None:
        return None
    trim = _libc_function("malloc_trim")
    if trim is None:
        logger.info("actor.malloc_trim_every_s=%g ignored: this C library has no malloc_trim", every_s)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return MallocTrimmer(every_s, trim).start()
