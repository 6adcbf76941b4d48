"""actor.malloc_mmap_threshold: glibc keeps serving large blocks by mmap once it is pinned."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from asyncopd.config import from_dict

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")

# After a 4 MiB block is freed, glibc's adaptive threshold rises to 4 MiB and the next one
# comes from the heap arena; pinned, it is mmapped again (mallinfo2().hblks counts mmapped blocks).
_PROBE = """
import ctypes, ctypes.util, sys
from asyncopd.actor.vllm_setup import fix_malloc_mmap_threshold
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Info
applied = fix_malloc_mmap_threshold(None if sys.argv[1] == "none" else int(sys.argv[1]))
before = libc.mallinfo2().hblks
libc.free(libc.malloc(4 << 20))
block = libc.malloc(4 << 20)
print(applied, libc.mallinfo2().hblks - before)
"""


def _probe(threshold: str) -> str:
    done = subprocess.run([sys.executable, "-c", _PROBE, threshold], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@glibc
def test_a_pinned_threshold_keeps_large_blocks_out_of_the_arena() -> None:
    assert _probe("none") == ["False", "0"]  # glibc's adaptive threshold moved the block into the arena
    assert _probe(str(from_dict({}).actor.malloc_mmap_threshold)) == ["True", "1"]


def test_a_non_positive_threshold_is_refused_with_the_fix() -> None:
    with pytest.raises(Exception, match=r"actor\.malloc_mmap_threshold=0"):
        from_dict({"actor": {"malloc_mmap_threshold": 0}})
