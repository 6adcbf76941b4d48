"""CURVE on real ZeroMQ sockets over loopback: holders of the job key talk (also from
another process), strangers get nothing through, and the wire is encrypted."""

from __future__ import annotations

import multiprocessing as mp
import select
import socket
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import zmq

from asyncopd.transport.security import JobKey
from asyncopd.transport.sockets import Channel, configure_security
from asyncopd.types import Rollout, ScoreAck, Shutdown

pytestmark = pytest.mark.distributed

HOST = "127.0.0.1"


@pytest.fixture
def job_key() -> Iterator[JobKey]:
    key = JobKey.generate()
    configure_security(key)
    yield key
    configure_security(None)


@pytest.fixture
def channels() -> Iterator[list[Channel]]:
    """Channels a test opens; closed at teardown."""
    opened: list[Channel] = []
    yield opened
    for channel in opened:
        channel.close()


def rollout(rollout_id: str) -> Rollout:
    ids = np.arange(3, 9, dtype=np.int32)
    return Rollout(rollout_id=rollout_id, kind="train", batch_index=0, group_id=0, actor_index=0,
                   prompt_ids=ids, response_ids=ids, behaviour_logprobs=np.zeros(6, np.float32),
                   token_policy_versions=np.zeros(6, np.int32), policy_version=0, reward=0.0, finish_reason="stop")


def stranger(kind: int, address: str, *, public: bytes | None = None, secret: bytes | None = None,
             serverkey: bytes | None = None) -> zmq.Socket:
    """A socket in its own context (as in another process), optionally with CURVE keys."""
    sock = zmq.Context().socket(kind)
    sock.linger = 0
    if serverkey is not None:
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = serverkey, public, secret
    sock.connect(address)
    return sock


def test_push_pull_with_the_job_key(job_key: JobKey, channels: list[Channel]) -> None:
    pull = Channel(zmq.PULL, bind_host=HOST)
    push = Channel(zmq.PUSH, connect=[pull.address])
    channels += [pull, push]
    for i in range(5):
        push.send(rollout(f"r{i}"))
    got = [pull.recv(timeout_s=5.0) for _ in range(5)]
    assert [g[1].rollout_id for g in got if g is not None] == [f"r{i}" for i in range(5)]
    assert pull.socket.curve_server and not push.socket.curve_server


def test_dealer_router_with_the_job_key(job_key: JobKey, channels: list[Channel]) -> None:
    router = Channel(zmq.ROUTER, bind_host=HOST)
    dealer = Channel(zmq.DEALER, connect=[router.address], identity=b"actor-0")
    channels += [router, dealer]
    dealer.send(rollout("r0"))
    identity, message = router.recv(timeout_s=5.0)
    assert identity == b"actor-0" and message.rollout_id == "r0"
    router.send(ScoreAck(policy_version=0, rollout_id="r0", ok=True), identity=identity)
    _, ack = dealer.recv(timeout_s=5.0)
    assert isinstance(ack, ScoreAck) and ack.rollout_id == "r0"


def test_a_channel_binds_as_server_and_connects_as_client(job_key: JobKey, channels: list[Channel]) -> None:
    source = Channel(zmq.PUSH, bind_host=HOST)
    both = Channel(zmq.PULL, bind_host=HOST, connect=[source.address])
    client = Channel(zmq.PUSH, connect=[both.address])
    channels += [source, both, client]
    source.socket.sndtimeo = 5000  # a bound PUSH waits for a peer; fail rather than hang
    source.send(Shutdown(policy_version=1, reason="to the client side"))
    client.send(Shutdown(policy_version=2, reason="to the server side"))
    got = {r[1].reason for r in (both.recv(timeout_s=5.0), both.recv(timeout_s=5.0)) if r is not None}
    assert got == {"to the client side", "to the server side"}


def _curve_client_process(secret: bytes, address: str, count: int) -> None:
    configure_security(JobKey.from_secret(secret))
    push = Channel(zmq.PUSH, connect=[address])
    for i in range(count):
        push.send(rollout(f"p{i}"))
    push.close(linger_s=5.0)
    configure_security(None)


def test_a_process_with_the_job_key_gets_through(job_key: JobKey, channels: list[Channel]) -> None:
    pull = Channel(zmq.PULL, bind_host=HOST)
    channels.append(pull)
    proc = mp.get_context("spawn").Process(target=_curve_client_process, args=(job_key.secret, pull.address, 3))
    proc.start()
    try:
        got = [pull.recv(timeout_s=30.0) for _ in range(3)]
        proc.join(timeout=30)
    finally:
        if proc.is_alive():
            proc.kill()
    assert [g[1].rollout_id for g in got if g is not None] == ["p0", "p1", "p2"]
    assert proc.exitcode == 0


@pytest.mark.parametrize("who", ["no key", "wrong server key", "foreign client key", "raw tcp"])
def test_strangers_get_nothing_through_and_the_server_keeps_working(
        who: str, job_key: JobKey, channels: list[Channel]) -> None:
    router = Channel(zmq.ROUTER, bind_host=HOST)
    channels.append(router)
    from asyncopd.transport import sockets

    denied_before = sockets._security.num_denied
    payload = Shutdown(policy_version=0, reason="injected")
    other_public, other_secret = zmq.curve_keypair()
    if who == "raw tcp":
        port = int(router.address.rsplit(":", 1)[1])
        with socket.create_connection((HOST, port)) as raw:
            raw.sendall(b"\xff" + b"\x00" * 8 + b"\x7f" + b"garbage" * 100)
            time.sleep(0.2)
    else:
        keys = {"no key": {},
                "wrong server key": dict(serverkey=other_public, public=other_public, secret=other_secret),
                "foreign client key": dict(serverkey=job_key.public, public=other_public, secret=other_secret)}[who]
        sock = stranger(zmq.DEALER, router.address, **keys)
        from asyncopd.transport.codec import encode

        sock.send(encode(payload))
        sock.send(b"not a message")
    assert router.recv(timeout_s=0.5) is None
    assert router.num_rejected == 0  # nothing foreign even reached the decoder
    if who == "foreign client key":
        assert sockets._security.num_denied > denied_before
    else:
        assert sockets._security.num_denied == denied_before  # refused before ZAP: no key to check
    friend = Channel(zmq.DEALER, connect=[router.address], identity=b"friend")
    channels.append(friend)
    friend.send(rollout("after"))
    identity, message = router.recv(timeout_s=5.0)
    assert identity == b"friend" and message.rollout_id == "after"


def _relay(listener: socket.socket, target_port: int, client_bytes: bytearray, stop: threading.Event) -> None:
    """Forward one TCP connection to ``target_port``, recording what the client sends."""
    client, _ = listener.accept()
    upstream = socket.create_connection((HOST, target_port))
    peer = {client: upstream, upstream: client}
    while not stop.is_set():
        for ready in select.select(list(peer), [], [], 0.05)[0]:
            data = ready.recv(65536)
            if not data:
                stop.set()
                break
            if ready is client:
                client_bytes += data
            peer[ready].sendall(data)
    client.close()
    upstream.close()


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "curve"])
def test_the_wire_is_encrypted(secure: bool, channels: list[Channel]) -> None:
    configure_security(JobKey.generate() if secure else None)
    try:
        pull = Channel(zmq.PULL, bind_host=HOST)
        channels.append(pull)
        listener = socket.create_server((HOST, 0))
        client_bytes, stop = bytearray(), threading.Event()
        relay = threading.Thread(target=_relay, daemon=True,
                                 args=(listener, int(pull.address.rsplit(":", 1)[1]), client_bytes, stop))
        relay.start()
        push = Channel(zmq.PUSH, connect=[f"tcp://{HOST}:{listener.getsockname()[1]}"])
        channels.append(push)
        push.send(rollout("secret-rollout-id"))
        assert pull.recv(timeout_s=5.0)[1].rollout_id == "secret-rollout-id"
        stop.set()
        relay.join(timeout=5)
        listener.close()
    finally:
        configure_security(None)
    assert (b"secret-rollout-id" in client_bytes) is not secure


def _teacher_process(secret: bytes, model_path: str, to_test: mp.Queue, from_test: mp.Queue) -> None:
    import torch

    from asyncopd.teacher.scorer import HFScorer
    from asyncopd.teacher.worker import TeacherWorker

    configure_security(JobKey.from_secret(secret))  # what the launcher does before a role starts
    torch.set_num_threads(1)
    worker = TeacherWorker(HFScorer(model_path), index=0, host=HOST, max_batch_tokens=256)
    to_test.put((worker.router.address, worker.inbox.address))
    worker.connect_learner(from_test.get(timeout=60))
    while worker.serve_once(0.1):
        pass
    worker.close()


def test_a_teacher_role_under_curve_serves_holders_and_ignores_strangers(
        tmp_path, job_key: JobKey, channels: list[Channel]) -> None:
    from asyncopd.tasks.tiny import save_tiny_model
    from asyncopd.transport.codec import encode
    from asyncopd.types import RolloutBatch, ScoredBatch

    model_path = str(save_tiny_model(tmp_path / "teacher", seed=3))
    ctx = mp.get_context("spawn")
    to_test, from_test = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_teacher_process, args=(job_key.secret, model_path, to_test, from_test))
    proc.start()
    try:
        learner = Channel(zmq.PULL, bind_host=HOST)
        channels.append(learner)
        router, inbox = to_test.get(timeout=120)
        from_test.put(learner.address)
        # Valid messages from strangers: a rollout to score, and a Shutdown that would end the worker.
        other_public, other_secret = zmq.curve_keypair()
        strangers = [stranger(zmq.DEALER, router),
                     stranger(zmq.PUSH, inbox, serverkey=job_key.public, public=other_public, secret=other_secret)]
        strangers[0].send(encode(rollout("stranger-0")))
        strangers[1].send(encode(Shutdown(policy_version=0, reason="injected")))
        dealer = Channel(zmq.DEALER, connect=[router], identity=b"actor-0")
        control = Channel(zmq.PUSH, connect=[inbox])
        channels += [dealer, control]
        time.sleep(0.5)  # the strangers' attempts come first
        dealer.send(RolloutBatch.of([rollout(f"r{i}") for i in range(4)]))
        scored: set[str] = set()
        deadline = time.monotonic() + 60
        while len(scored) < 4 and time.monotonic() < deadline:
            if (got := learner.recv(timeout_s=0.1)) is not None:
                assert isinstance(got[1], ScoredBatch)
                scored.update(s.rollout_id for s in got[1].scored)
        assert learner.recv(timeout_s=0.5) is None  # nothing for the stranger's rollout
        assert scored == {"r0", "r1", "r2", "r3"}
        acks: set[str] = set()
        while len(acks) < 4 and (got := dealer.recv(timeout_s=5.0)) is not None:
            acks.update(a.rollout_id for a in got[1].acks)
        assert acks == scored
        assert proc.is_alive()  # the injected Shutdown never arrived
        for sock in strangers:
            sock.close()
        control.send(Shutdown(policy_version=0, reason="test over"))
        proc.join(timeout=30)
        assert proc.exitcode == 0
    finally:
        if proc.is_alive():
            proc.kill()
