"""actor.malloc_trim_every_s: the trimmer gives free pages inside glibc's heap arena back.

Each probe runs in a fresh process (a heap of its own): it fills the arena with 64 KiB
blocks (below the 128 KiB mmap threshold, so they come from the heap), frees every
other one, keeps the last one so that no free space lies at the top (the part glibc
trims by itself), and reads RSS and mallinfo2 before and after.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from asyncopd.config import from_dict

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

_PROBE = """
import ctypes, ctypes.util, sys, time
from asyncopd.actor.malloc import fix_malloc_mmap_threshold, start_malloc_trimmer
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Info
def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
fix_malloc_mmap_threshold(131072)
blocks = [libc.malloc(64 << 10) for _ in range(1024)]  # 64 MiB in the heap arena
for b in blocks:
    ctypes.memset(b, 1, 64 << 10)  # resident
for b in blocks[:-1:2]:
    libc.free(b)  # 32 MiB of 64 KiB holes between blocks in use
time.sleep(0.2)
before, free_mb = rss_mb(), libc.mallinfo2().fordblks / 2**20
trimmer = start_malloc_trimmer(None if sys.argv[1] == "none" else float(sys.argv[1]))
time.sleep(1.0)
calls = 0 if trimmer is None else trimmer.num_calls
if trimmer is not None:
    trimmer.stop()
print(calls, round(free_mb), round(before - rss_mb()), round(libc.mallinfo2().fordblks / 2**20))
"""


def _probe(every_s: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", _PROBE, every_s], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [int(x) for x in done.stdout.split()]


@glibc
def test_the_trimmer_returns_the_free_space_inside_the_arena() -> None:
    calls, free_mb, released_mb, free_after_mb = _probe("0.1")
    assert calls >= 3
    assert free_mb >= 30  # the holes are there, and stay free space of the arena (madvised, not unmapped)
    assert free_after_mb >= 30
    assert released_mb >= 25  # but are no longer resident


@glibc
def test_without_it_the_holes_stay_resident() -> None:
    calls, free_mb, released_mb, _ = _probe("none")
    assert calls == 0 and free_mb >= 30
    assert released_mb < 5


def test_the_default_trims_and_a_non_positive_interval_is_refused_with_the_fix() -> None:
    assert from_dict({}).actor.malloc_trim_every_s == 30.0
    assert from_dict({"actor": {"malloc_trim_every_s": None}}).actor.malloc_trim_every_s is None
    with pytest.raises(Exception, match=r"actor\.malloc_trim_every_s=0"):
        from_dict({"actor": {"malloc_trim_every_s": 0}})
