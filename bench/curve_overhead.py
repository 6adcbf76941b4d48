"""What does ZeroMQ CURVE (cluster.auth=curve) cost on the wire?

The plain-vs-CURVE half of ``bench/auth_overhead.py`` (same Channels on loopback,
same 4 KiB frames, same latency and throughput measurements; see that file), for
when the HMAC prototype is not of interest. The last line is
``curve_overhead latency <x> throughput <x>`` (curve / plain).

Usage: python bench/curve_overhead.py [--round-trips N] [--messages M] [--repeats R]
"""

from __future__ import annotations

from auth_overhead import measure_modes, parse_args


def main() -> None:
    results = measure_modes(("plain", "curve"), parse_args(__doc__))
    latency = results["curve"][0] / results["plain"][0]
    throughput = results["curve"][2] / results["plain"][2]
    print(f"curve_overhead latency {latency:.2f}x throughput {throughput:.2f}x")


if __name__ == "__main__":
    main()
