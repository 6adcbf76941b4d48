"""The rendezvous store's shutdown flag: signed with the job key, a forged one ignored."""

from __future__ import annotations

import torch.distributed as dist

from asyncopd.transport.discovery import Rendezvous


def test_a_shutdown_flag_without_the_job_key_signature_is_ignored(caplog) -> None:
    store = dist.HashStore()
    role = Rendezvous(store, rank=1, world_size=3, timeout_s=5.0, signing_key=b"job-secret")
    learner = Rendezvous(store, rank=0, world_size=3, timeout_s=5.0, signing_key=b"job-secret")
    assert not role.shutdown_requested()
    store.set("asyncopd/attempt_0/shutdown", "training finished")  # a foreign local process, no key
    assert not role.shutdown_requested()
    stranger = Rendezvous(store, rank=0, world_size=3, timeout_s=5.0, signing_key=b"another key")
    stranger.announce_shutdown("training finished")
    assert not role.shutdown_requested()
    assert role.num_forged_shutdowns == 2
    assert "ignored a shutdown flag" in caplog.text
    learner.announce_shutdown("training finished")
    assert role.shutdown_requested()


def test_without_a_job_key_the_flag_is_unsigned() -> None:
    store = dist.HashStore()
    plain = Rendezvous(store, rank=0, world_size=2, timeout_s=5.0)
    assert not plain.shutdown_requested()
    plain.announce_shutdown("done: at last")
    assert plain.shutdown_requested()
    assert not Rendezvous(store, rank=1, world_size=2, timeout_s=5.0, signing_key=b"k").shutdown_requested()
