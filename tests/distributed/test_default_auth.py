"""Under the default config (cluster.auth=auto, host 127.0.0.1), a foreign local process
can neither stop a job (forged Shutdown) nor feed it (forged ScoredRollout): the job's
sockets are set up by the real launcher functions, the foreign one is a plain local
process with ZeroMQ, with or without a CURVE key of its own."""

from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np
import pytest
import zmq

from asyncopd.config import from_dict
from asyncopd.transport.codec import encode
from asyncopd.types import Rollout, ScoredRollout, Shutdown

pytestmark = pytest.mark.distributed


class _FakeRendezvous:
    """The learner's rendezvous, with the real method names, in one process."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.addresses = addresses

    def publish(self, key: str, value: str) -> None:
        self.addresses[key] = value

    def lookup(self, key: str) -> str:
        return self.addresses[key]

    def announce_shutdown(self, reason: str) -> None:
        pass


def _job(env: dict[str, str], to_test: mp.Queue, from_test: mp.Queue) -> None:
    """Learner rank 0's inbox + buffer, and an actor's control inbox, as the launcher sets them up."""
    os.environ.update(env)
    from asyncopd.buffer import StalenessBuffer
    from asyncopd.launch import install_security
    from asyncopd.learner.evaluation import EvalAccumulator
    from asyncopd.learner.io import LearnerIO
    from asyncopd.transport.sockets import Channel

    cfg = from_dict({"run": {"name": "auth-test"}})
    security = install_security(cfg)
    actor_inbox = Channel(zmq.PULL, bind_host=cfg.cluster.host)
    teacher_inbox = Channel(zmq.PULL, bind_host=cfg.cluster.host)
    rendezvous = _FakeRendezvous({"actor/0/inbox": actor_inbox.address, "teacher/0/inbox": teacher_inbox.address})
    buffer = StalenessBuffer(batch_size=8, max_staleness=1, capacity=32)
    io = LearnerIO(cfg, rendezvous, buffer=buffer, evaluation=EvalAccumulator(1, 1), on_eval=lambda m: None)
    to_test.put({"learner": io.inbox.address, "actor": actor_inbox.address, "secure": security is not None})
    shutdowns: list[str] = []
    deadline = time.monotonic() + 60
    while not shutdowns and time.monotonic() < deadline:
        io.pump(0.05, 0)
        if (got := actor_inbox.recv(timeout_s=0.0)) is not None and isinstance(got[1], Shutdown):
            shutdowns.append(got[1].reason)  # what the actor loop would stop on
    held = buffer._held.get(0, [])
    to_test.put({"shutdowns": shutdowns, "accepted": sorted(s.rollout_id for s in held),
                 "denied": security.num_denied if security else None})
    for channel in (actor_inbox, teacher_inbox):
        channel.close()
    io.close()


def scored(rollout_id: str) -> ScoredRollout:
    ids = np.arange(3, 9, dtype=np.int32)
    r = Rollout(rollout_id=rollout_id, kind="train", batch_index=0, group_id=0, actor_index=0,
                prompt_ids=ids, response_ids=ids, behaviour_logprobs=np.zeros(6, np.float32),
                token_policy_versions=np.zeros(6, np.int32), policy_version=0, reward=1.0, finish_reason="stop")
    return ScoredRollout(rollout=r, teacher_logprobs=np.zeros(6, np.float32), teacher_index=0, score_s=0.0,
                         policy_version=0)


def foreign(address: str, curve_server_key: bytes | None = None) -> zmq.Socket:
    """A PUSH socket of another local process: no key, or a CURVE keypair of its own."""
    sock = zmq.Context().socket(zmq.PUSH)
    sock.linger = 0
    if curve_server_key is not None:
        public, secret = zmq.curve_keypair()
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = curve_server_key, public, secret
    sock.connect(address)
    return sock


def test_forged_shutdown_and_scored_rollouts_are_refused_under_the_default_security(tmp_path) -> None:
    from asyncopd.launch import world_environment
    from asyncopd.transport.security import JOB_SECRET_ENV, JobKey
    from asyncopd.transport.sockets import Channel, configure_security

    cfg = from_dict({})
    assert (cfg.cluster.auth, cfg.cluster.host, cfg.cluster.resolved_auth) == ("auto", "127.0.0.1", "curve")
    job_env = world_environment(cfg)  # what `python -m asyncopd.launch` hands its ranks
    env = {JOB_SECRET_ENV: job_env[JOB_SECRET_ENV], "GROUP_WORLD_SIZE": "1"}
    ctx = mp.get_context("spawn")
    to_test, from_test = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_job, args=(env, to_test, from_test))
    proc.start()
    sockets: list = []
    try:
        addresses = to_test.get(timeout=60)
        assert addresses["secure"]
        job_public = JobKey.from_secret(env[JOB_SECRET_ENV].encode()).public
        for server_key in (None, job_public):  # no key at all; a key of its own (knowing the job's public key)
            learner, actor = foreign(addresses["learner"], server_key), foreign(addresses["actor"], server_key)
            sockets += [learner, actor]
            for i in range(8):
                learner.send(encode(scored(f"forged-{i}")), flags=zmq.NOBLOCK)
            actor.send(encode(Shutdown(policy_version=0, reason="forged")), flags=zmq.NOBLOCK)
        time.sleep(2.0)  # the forgeries had their chance, long before the real messages
        configure_security(JobKey.from_secret(env[JOB_SECRET_ENV].encode()))  # a holder of the job key
        learner = Channel(zmq.PUSH, connect=[addresses["learner"]])
        actor = Channel(zmq.PUSH, connect=[addresses["actor"]])
        sockets += [learner, actor]
        learner.send(scored("job-0"))
        time.sleep(0.5)
        actor.send(Shutdown(policy_version=0, reason="training finished"))
        result = to_test.get(timeout=60)
        assert result["shutdowns"] == ["training finished"]
        assert result["accepted"] == ["job-0"]
        assert result["denied"] >= 1  # the CURVE client with a foreign key reached the gate and was counted
        proc.join(timeout=30)
        assert proc.exitcode == 0
    finally:
        configure_security(None)
        for sock in sockets:
            sock.close()
        if proc.is_alive():
            proc.kill()
