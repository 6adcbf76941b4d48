"""CURVE or a per-message MAC: what does authenticating every message cost on loopback?

The two ways to make every ZeroMQ message of a job authenticated (issue 10, point 5):

- ``curve``: ZeroMQ CURVE with the job key (what asyncopd runs: handshake per
  connection, then every frame encrypted and authenticated by libzmq's I/O thread);
- ``hmac``: a prototype of the cheaper alternative, an HMAC-SHA256 with the job key
  appended to each frame by the sender and checked by the receiver in Python
  (authentication only, no encryption, no replay protection);

next to ``plain`` (no security). Same job Channels on loopback, 4 KiB frames (about
one rollout of a few hundred tokens):

- latency: DEALER -> ROUTER -> DEALER round trips, one at a time (median, p99);
- throughput: a PUSH -> PULL stream, the sender on its own thread.

Both ends live in one process, so one process pays for both sides: an upper bound on
the per-process cost of two. The last line is
``auth_overhead curve latency <x> throughput <x> hmac latency <x> throughput <x>`` (over plain).

Usage: python bench/auth_overhead.py [--round-trips N] [--messages M] [--repeats R]
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import threading
import time
from collections.abc import Callable
from statistics import median

import zmq

from asyncopd.transport.security import JobKey
from asyncopd.transport.sockets import Channel, configure_security

FRAME = os.urandom(4096)
MAC_KEY = os.urandom(32)
_MAC_BYTES = 32


def _sign(frame: bytes) -> bytes:
    return frame + hmac.digest(MAC_KEY, frame, hashlib.sha256)


def _verify(data: bytes) -> bytes:
    frame, mac = data[:-_MAC_BYTES], data[-_MAC_BYTES:]
    if not hmac.compare_digest(mac, hmac.digest(MAC_KEY, frame, hashlib.sha256)):
        raise ValueError("bad MAC")
    return frame


def _identity(data: bytes) -> bytes:
    return data


def round_trips_us(num: int, sign: Callable[[bytes], bytes], verify: Callable[[bytes], bytes]) -> list[float]:
    router = Channel(zmq.ROUTER, bind_host="127.0.0.1")
    dealer = Channel(zmq.DEALER, connect=[router.address], identity=b"bench")
    times = []
    for i in range(num + 100):  # the first 100 warm up (handshake, buffers)
        start = time.perf_counter()
        dealer.socket.send(sign(FRAME))
        identity, frame = router.socket.recv_multipart()
        router.socket.send_multipart([identity, sign(verify(frame))])
        verify(dealer.socket.recv())
        if i >= 100:
            times.append((time.perf_counter() - start) * 1e6)
    router.close()
    dealer.close()
    return times


def stream_msgs_per_s(num: int, sign: Callable[[bytes], bytes], verify: Callable[[bytes], bytes]) -> float:
    pull = Channel(zmq.PULL, bind_host="127.0.0.1")
    push = Channel(zmq.PUSH, connect=[pull.address])
    push.socket.send(FRAME)
    pull.socket.recv()  # connected and handshaken before the clock starts
    sender = threading.Thread(target=lambda: [push.socket.send(sign(FRAME), copy=False) for _ in range(num)])
    start = time.perf_counter()
    sender.start()
    for _ in range(num):
        verify(pull.socket.recv())
    elapsed = time.perf_counter() - start
    sender.join()
    pull.close()
    push.close()
    return num / elapsed


def measure(mode: str, args: argparse.Namespace) -> tuple[float, float, float]:
    configure_security(JobKey.generate() if mode == "curve" else None)
    sign, verify = (_sign, _verify) if mode == "hmac" else (_identity, _identity)
    try:
        latencies = [round_trips_us(args.round_trips, sign, verify) for _ in range(args.repeats)]
        rates = [stream_msgs_per_s(args.messages, sign, verify) for _ in range(args.repeats)]
    finally:
        configure_security(None)
    best = min(latencies, key=median)
    best.sort()
    return median(best), best[int(0.99 * len(best))], max(rates)


def parse_args(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3, help="best of R runs per setting")
    return parser.parse_args()


def measure_modes(modes: tuple[str, ...], args: argparse.Namespace) -> dict[str, tuple[float, float, float]]:
    """(p50 us, p99 us, msgs/s) of each mode, each printed as it is measured."""
    results = {}
    for mode in modes:
        p50, p99, rate = results[mode] = measure(mode, args)
        print(f"{mode:5s}  round trip p50 {p50:7.1f} us  p99 {p99:7.1f} us   "
              f"stream {rate:9.0f} msg/s  {rate * len(FRAME) / 2**20:7.1f} MiB/s", flush=True)
    return results


def main() -> None:
    results = measure_modes(("plain", "curve", "hmac"), parse_args(__doc__))
    start = time.perf_counter()
    for _ in range(20_000):
        _verify(_sign(FRAME))
    mac_us = (time.perf_counter() - start) / 20_000 * 1e6
    print(f"hmac   sign + verify of one 4 KiB frame: {mac_us:.1f} us of Python CPU")
    ratios = " ".join(f"{mode} latency {results[mode][0] / results['plain'][0]:.2f}x "
                      f"throughput {results[mode][2] / results['plain'][2]:.2f}x" for mode in ("curve", "hmac"))
    print(f"auth_overhead {ratios}")


if __name__ == "__main__":
    main()
