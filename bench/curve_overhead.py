"""What does ZeroMQ CURVE (cluster.auth=curve) cost on the wire?

Opens the job's own Channels on loopback twice, without security and with a job
key installed (``sockets.configure_security``), and measures with 4 KiB frames
(about one rollout of a few hundred tokens):

- latency: DEALER -> ROUTER -> DEALER round trips, one at a time (median, p99);
- throughput: a PUSH -> PULL stream, the sender on its own thread.

Both ends live in one process, so one ZeroMQ I/O thread encrypts *and* decrypts:
an upper bound on the overhead of two processes, each with its own I/O thread.
The last line is ``curve_overhead latency <x> throughput <x>`` (curve / plain).

Usage: python bench/curve_overhead.py [--round-trips N] [--messages M] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from statistics import median

import zmq

from asyncopd.transport.security import JobKey
from asyncopd.transport.sockets import Channel, configure_security

FRAME = os.urandom(4096)


def round_trips_us(num: int) -> list[float]:
    router = Channel(zmq.ROUTER, bind_host="127.0.0.1")
    dealer = Channel(zmq.DEALER, connect=[router.address], identity=b"bench")
    times = []
    for i in range(num + 100):  # the first 100 warm up (handshake, buffers)
        start = time.perf_counter()
        dealer.socket.send(FRAME)
        identity, frame = router.socket.recv_multipart()
        router.socket.send_multipart([identity, frame])
        dealer.socket.recv()
        if i >= 100:
            times.append((time.perf_counter() - start) * 1e6)
    router.close()
    dealer.close()
    return times


def stream_msgs_per_s(num: int) -> float:
    pull = Channel(zmq.PULL, bind_host="127.0.0.1")
    push = Channel(zmq.PUSH, connect=[pull.address])
    push.socket.send(FRAME)
    pull.socket.recv()  # connected and handshaken before the clock starts
    sender = threading.Thread(target=lambda: [push.socket.send(FRAME, copy=False) for _ in range(num)])
    start = time.perf_counter()
    sender.start()
    for _ in range(num):
        pull.socket.recv(copy=False)
    elapsed = time.perf_counter() - start
    sender.join()
    pull.close()
    push.close()
    return num / elapsed


def measure(secure: bool, args: argparse.Namespace) -> tuple[float, float, float]:
    configure_security(JobKey.generate() if secure else None)
    try:
        latencies = [round_trips_us(args.round_trips) for _ in range(args.repeats)]
        rates = [stream_msgs_per_s(args.messages) for _ in range(args.repeats)]
    finally:
        configure_security(None)
    best = min(latencies, key=median)
    best.sort()
    return median(best), best[int(0.99 * len(best))], max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--round-trips", type=int, default=5000)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3, help="best of R runs per setting")
    args = parser.parse_args()
    results = {}
    for name, secure in (("plain", False), ("curve", True)):
        p50, p99, rate = results[name] = measure(secure, args)
        print(f"{name:5s}  round trip p50 {p50:7.1f} us  p99 {p99:7.1f} us   "
              f"stream {rate:9.0f} msg/s  {rate * len(FRAME) / 2**20:7.1f} MiB/s", flush=True)
    latency = results["curve"][0] / results["plain"][0]
    throughput = results["curve"][2] / results["plain"][2]
    print(f"curve_overhead latency {latency:.2f}x throughput {throughput:.2f}x")


if __name__ == "__main__":
    main()
