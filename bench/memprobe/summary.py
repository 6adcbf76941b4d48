"""Slopes of a memory probe's series (see sitecustomize.py here), as bench/soak.py fits RSS.

For one rank's probe file (``<ASYNCOPD_MEMPROBE>/rank<R>.jsonl``), prints the first and
last value of each series after ``--from-s`` seconds (default: half of the probe's span,
the second half of the run as soak.py fits it; ``--to-s``: up to) and its least-squares slope in MB/h with
the 95% Newey-West interval of bench/soak.py. Series: rss, anon, glibc's arena (heap
bytes), in use (uordblks), free inside the arenas (fordblks), mmapped chunks (hblkhd),
the [heap] mapping's resident size (smaps), and heap_free_resident = [heap] Rss minus the
in-use bytes of the arena: the arena's free space that is still resident, what
``malloc_trim`` gives back.

Usage: python bench/memprobe/summary.py PROBE/rank1.jsonl [--from-s S] [--to-s T]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from soak import slope_ci_mb_per_h  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", type=Path)
    parser.add_argument("--from-s", type=float, default=None)
    parser.add_argument("--to-s", type=float, default=float("inf"))
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.probe.read_text().splitlines() if line.strip()]
    start = args.from_s if args.from_s is not None else rows[-1]["t_s"] / 2
    kept = [r for r in rows if start <= r["t_s"] <= args.to_s]
    series = {
        "rss": lambda r: r["rss_mb"], "anon": lambda r: r["anon_mb"], "arena": lambda r: r["arena"],
        "in_use": lambda r: r["uordblks"], "free_in_arenas": lambda r: r["fordblks"],
        "mmapped": lambda r: r["hblkhd"],
        "heap_rss": lambda r: r["smaps"].get("heap", 0.0),
        "heap_free_resident": lambda r: r["smaps"].get("heap", 0.0) - (r["arena"] - r["fordblks"]),
    }
    print(f"{args.probe}: {len(kept)} samples from t={kept[0]['t_s']:.0f} s to {kept[-1]['t_s']:.0f} s")
    for name, get in series.items():
        values = [get(r) for r in kept]
        slope, ci = slope_ci_mb_per_h([r["t_s"] for r in kept], values)
        print(f"  {name:20s} {values[0]:7.1f} -> {values[-1]:7.1f} MB (min {min(values):7.1f}, "
              f"max {max(values):7.1f}), {slope:+7.1f} +- {ci:5.1f} MB/h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
