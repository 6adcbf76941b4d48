"""torchrun for a single-node job, with its rendezvous stores listening on loopback only.

``torchrun --standalone`` (like every torchrun) runs c10d ``TCPStore`` servers, and a
TCPStore server listens on *all* interfaces whatever host it is given, so a
single-node job's store is reachable from the network. TCPStore can instead serve
on a socket handed to it (``master_listen_fd``); this module makes every TCPStore
server that torchrun's agent creates serve on a socket bound to 127.0.0.1, then runs
torchrun unchanged. ``python -m asyncopd.launch`` starts single-node worlds with::

    python -m asyncopd.transport.loopback_store --standalone --local-addr=127.0.0.1 ...

(``--local-addr`` makes the ranks reach the store at 127.0.0.1 rather than at this
host's name). The store is still unauthenticated: local processes can reach it,
which is why the store's shutdown flag is signed with the job key
(:mod:`asyncopd.transport.discovery`).

This module patches torch's agent process only (never the ranks), and only TCPStore
construction.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import torch.distributed as dist

__all__ = ["LOOPBACK", "loopback_tcp_store", "install", "main"]

LOOPBACK = "127.0.0.1"
_TCPStore = dist.TCPStore


def loopback_tcp_store(host_name: str, port: int, *args: Any, is_master: bool = False, **kwargs: Any) -> dist.TCPStore:
    """``dist.TCPStore`` whose server (``is_master=True``) listens on 127.0.0.1:``port`` only
    (``port`` 0: one the OS picks); clients are plain TCPStore clients."""
    if is_master and kwargs.get("master_listen_fd") is None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, port))
        listener.listen(2048)
        port = listener.getsockname()[1]
        kwargs["master_listen_fd"] = listener.detach()  # the store owns and closes it
        kwargs.setdefault("use_libuv", True)  # the libuv server takes a listening fd
    return _TCPStore(host_name, port, *args, is_master=is_master, **kwargs)


def install() -> None:
    """Route torchrun's TCPStore servers (c10d rendezvous and the workers' shared store) to loopback."""
    from torch.distributed.elastic.rendezvous import c10d_rendezvous_backend, dynamic_rendezvous

    c10d_rendezvous_backend.TCPStore = loopback_tcp_store  # type: ignore[assignment]

    def shared_store_server(self: Any, master_addr: str, master_port: int) -> dist.TCPStore:
        return loopback_tcp_store(master_addr, master_port, is_master=True, multi_tenant=True)

    dynamic_rendezvous.DynamicRendezvousHandler._create_tcp_store_server = shared_store_server


def main() -> None:
    install()
    from torch.distributed.run import main as torchrun_main

    torchrun_main(sys.argv[1:])


if __name__ == "__main__":
    main()
