"""Memory probe for soak studies (not imported by asyncopd): put this directory on
PYTHONPATH and set ASYNCOPD_MEMPROBE=<dir>. Every torchrun worker (a process with
RANK and TORCHELASTIC_RUN_ID set) starts a daemon thread that, every
ASYNCOPD_MEMPROBE_EVERY_S seconds (default 30), appends one JSON line to
<dir>/rank<R>.jsonl: RSS and anonymous memory, glibc ``mallinfo2`` (arena: heap
bytes from brk/arena mmaps; hblkhd: bytes in mmapped chunks; uordblks: in use;
fordblks: free inside the arenas, i.e. fragmentation), gc object count, and with
ASYNCOPD_MEMPROBE_TRACEMALLOC=1 the Python allocator's traced bytes and the 12
largest growths since a base snapshot (by file:line; ASYNCOPD_MEMPROBE_FRAMES frames),
taken ASYNCOPD_MEMPROBE_BASE_N samples after tracing starts; tracing starts at
ASYNCOPD_MEMPROBE_TRACE_AFTER_S (tracing vLLM's start-up is very slow), so only
allocations made after it are seen: what grows in the diff is what stays.
Also sys.getallocatedblocks() (pymalloc blocks in use: Python objects) and threads.

ASYNCOPD_MEMPROBE_TRIM=1 also calls ``malloc_trim(0)`` after each sample and
records the RSS it gave back (an A/B for fragmentation).
"""

import os

if os.environ.get("ASYNCOPD_MEMPROBE") and "RANK" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ:
    import ctypes
    import gc
    import json
    import sys
    import threading
    import time
    import tracemalloc

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Mallinfo2
    _every = float(os.environ.get("ASYNCOPD_MEMPROBE_EVERY_S", "30"))
    _trace = os.environ.get("ASYNCOPD_MEMPROBE_TRACEMALLOC") == "1"
    _trim = os.environ.get("ASYNCOPD_MEMPROBE_TRIM") == "1"
    _path = os.path.join(os.environ["ASYNCOPD_MEMPROBE"], f"rank{os.environ['RANK']}.jsonl")
    os.makedirs(os.environ["ASYNCOPD_MEMPROBE"], exist_ok=True)
    _trace_after = float(os.environ.get("ASYNCOPD_MEMPROBE_TRACE_AFTER_S", "0"))
    if _trace and _trace_after <= 0:
        tracemalloc.start(int(os.environ.get("ASYNCOPD_MEMPROBE_FRAMES", "1")))

    def _proc(field_file, key):
        with open(field_file) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
        return None

    def _smaps_summary():
        """Rss (MB) of the anonymous mappings by kind: [heap] (glibc's main arena),
        1 MiB mappings (pymalloc arenas), other anonymous ones by size class."""
        out = {}
        kind = None
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    parts = line.split()
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    path = parts[5] if len(parts) > 5 else ""
                    size = hi - lo
                    if path == "[heap]":
                        kind = "heap"
                    elif path:
                        kind = None
                    elif size == 1 << 20:
                        kind = "anon_1m"
                    elif size < 1 << 20:
                        kind = "anon_lt1m"
                    elif size < 64 << 20:
                        kind = "anon_1m_64m"
                    else:
                        kind = "anon_ge64m"
                elif first == "Rss:" and kind is not None:
                    out[kind] = out.get(kind, 0.0) + int(line.split()[1]) / 1024
        return {k: round(v, 1) for k, v in out.items()}

    def _loop():
        start = time.monotonic()
        base = None
        n = 0
        while True:
            time.sleep(_every)
            n += 1
            record = {"t_s": round(time.monotonic() - start, 1), "pid": os.getpid(),
                      "rss_mb": _proc("/proc/self/status", "VmRSS:"),
                      "anon_mb": _proc("/proc/self/smaps_rollup", "Anonymous:")}
            mi = _libc.mallinfo2()
            record.update({k: round(getattr(mi, k) / 2**20, 1) for k in ("arena", "hblkhd", "uordblks", "fordblks",
                                                                         "keepcost")})
            record["hblks"] = mi.hblks
            record["smaps"] = _smaps_summary()
            record["gc_objects"] = len(gc.get_objects())
            record["pymalloc_blocks"] = sys.getallocatedblocks()
            record["threads"] = threading.active_count()
            if _trace and not tracemalloc.is_tracing() and record["t_s"] >= _trace_after:
                tracemalloc.start(int(os.environ.get("ASYNCOPD_MEMPROBE_FRAMES", "1")))
                n = 0
            elif _trace and tracemalloc.is_tracing():
                snap = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, __file__), tracemalloc.Filter(False, tracemalloc.__file__),
                     tracemalloc.Filter(False, "*/json/*")])
                record["traced_mb"] = round(tracemalloc.get_traced_memory()[0] / 2**20, 2)
                if base is None and n >= int(os.environ.get("ASYNCOPD_MEMPROBE_BASE_N", "6")):
                    base = snap
                    counts = {}
                    for obj in gc.get_objects():
                        counts[type(obj).__name__] = counts.get(type(obj).__name__, 0) + 1
                    _loop.base_counts = counts
                elif base is not None:
                    diff = snap.compare_to(base, "traceback" if int(os.environ.get("ASYNCOPD_MEMPROBE_FRAMES", "1")) > 1 else "lineno")
                    record["top"] = [[" <- ".join(f"{fr.filename.rsplit('site-packages/', 1)[-1]}:{fr.lineno}"
                                                  for fr in d.traceback), round(d.size_diff / 1024, 1), d.count_diff]
                                     for d in diff[:12]]
                    counts = {}
                    for obj in gc.get_objects():
                        counts[type(obj).__name__] = counts.get(type(obj).__name__, 0) + 1
                    grown = sorted(((c - _loop.base_counts.get(k, 0), k) for k, c in counts.items()), reverse=True)[:10]
                    record["types_grown"] = [[k, d] for d, k in grown]
                del snap
            if _trim:
                t0 = time.perf_counter()
                _libc.malloc_trim(0)
                record["trim_ms"] = round((time.perf_counter() - t0) * 1000, 2)
                record["rss_after_trim_mb"] = _proc("/proc/self/status", "VmRSS:")
            with open(_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    threading.Thread(target=_loop, name="asyncopd-memprobe", daemon=True).start()
