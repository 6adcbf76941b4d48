"""torchrun's stores on loopback: a TCPStore server made by the patch listens on
127.0.0.1 only, and the torch functions the patch replaces still exist."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from asyncopd.transport.loopback_store import loopback_tcp_store


def listening_addresses(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp{,6}) of sockets listening on ``port``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A: LISTEN
                found.append(address)
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's socket table")
def test_a_patched_store_server_listens_on_loopback_only() -> None:
    server = loopback_tcp_store("localhost", 0, is_master=True, multi_tenant=True, timeout=timedelta(seconds=10))
    client = dist.TCPStore("127.0.0.1", server.port, is_master=False, timeout=timedelta(seconds=10))
    client.set("asyncopd/x", "1")
    assert server.get("asyncopd/x") == b"1"
    assert listening_addresses(server.port) == ["0100007F"]  # 127.0.0.1, and nothing else
    plain = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=10))
    assert "0100007F" not in listening_addresses(plain.port)  # what torchrun does unpatched: every interface


def test_the_patched_torch_entry_points_exist() -> None:
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous

    assert c10d_rendezvous_backend.TCPStore is dist.TCPStore
    assert callable(dynamic_rendezvous.DynamicRendezvousHandler._create_tcp_store_server)
