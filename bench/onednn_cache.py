"""How much memory oneDNN's kernel cache takes in an actor, outside a job.

vLLM's CPU linear layers run oneDNN matmuls through a handler per layer
(``create_onednn_mm``, rebuilt at every weight reload), and oneDNN compiles one
kernel per (layer shape, token count M) into a process-wide cache of
``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` entries (oneDNN's default: 1024). An actor meets
new token counts for a long time (every batch of prompts sums to another M), so
that cache fills slowly: the slow RSS rise of the soak (issue 10).

This script replays it with the demo student's layer shapes: per "step", fresh
handlers (a weight reload), then three GEMM rounds at random M (half decode-sized
1..64, half prefill-sized 64..2048). One child process per capacity (oneDNN reads
the variable once); prints RSS and glibc's malloc arena every 200 steps, then the
time of a GEMM at a new M (a kernel compilation) against a cached one.

Usage: python bench/onednn_cache.py [--steps 1000] [--capacities default,512,128]
Single-threaded, light; timings taken beside other work are indicative only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

CHILD = r'''
import ctypes, random, statistics, sys, time
import torch
import vllm._custom_ops as ops
torch.set_num_threads(1)
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6"); libc.mallinfo2.restype = MI
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
shapes = [(64, 128), (64, 64), (64, 256), (128, 64), (64, 40)]  # (K, N): qkv, o, gate_up, down, lm_head
weights = [torch.randn(k, n) for k, n in shapes]
rng = random.Random(0)
steps = int(sys.argv[1])
start = time.perf_counter()
for step in range(steps + 1):
    handlers = [ops.create_onednn_mm(w.clone(), 32) for w in weights]
    for _ in range(3):
        m = rng.randint(1, 64) if rng.random() < 0.5 else rng.randint(64, 2048)
        for h, (k, n) in zip(handlers, shapes):
            ops.onednn_mm(h, torch.randn(m, k), None)
    if step % 200 == 0:
        print(f"  step {step:5d}  {time.perf_counter() - start:6.1f} s  RSS {rss():6.0f} MB  "
              f"malloc arena {libc.mallinfo2().arena / 2**20:6.0f} MB", flush=True)
h = ops.create_onednn_mm(torch.randn(64, 256), 32)
new, seen = [], []
for m in range(3000, 3200):
    x = torch.randn(m, 64)
    t = time.perf_counter(); ops.onednn_mm(h, x, None); new.append(time.perf_counter() - t)
    t = time.perf_counter(); ops.onednn_mm(h, x, None); seen.append(time.perf_counter() - t)
print(f"  GEMM [M x 64] @ [64 x 256], M in 3000..3199: new M {1e3 * statistics.median(new):.2f} ms, "
      f"cached {1e3 * statistics.median(seen):.2f} ms (median)")
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--capacities", default="default,512,128")
    args = parser.parse_args()
    for capacity in args.capacities.split(","):
        env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR")
        env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
        if capacity != "default":
            env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = capacity
        print(f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={capacity}", flush=True)
        subprocess.run([sys.executable, "-c", CHILD, str(args.steps)], env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
