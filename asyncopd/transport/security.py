"""ZeroMQ CURVE authentication and encryption with one keypair per job.

Every role of a job holds the same CURVE keypair, the *job key*:

- sockets that bind are CURVE servers with the job secret key;
- sockets that connect are CURVE clients that expect the job public key from the
  server and present the job keypair as their own;
- each process runs pyzmq's ZAP authenticator (``ThreadAuthenticator``), which
  admits only clients presenting the job public key. CURVE makes a client prove
  it holds the secret half of the key it presents, so only holders of the job
  secret key get a connection; everything on the wire is encrypted.

A peer without the key never completes a handshake, so nothing it sends reaches a
:class:`~asyncopd.transport.sockets.Channel`. Denied handshakes that reach the
authenticator (a valid CURVE client with another key) are counted and logged.

The key comes from ``cluster.auth_key_file`` (a pyzmq certificate, written by
``python -m asyncopd.transport.security keygen DIR`` and copied to every node like an
SSH key) or, for a single-node job started by ``python -m asyncopd.launch``, is made
in memory by the launcher and handed to its ranks through the environment. The ranks
of a single-node world started with ``torchrun`` directly share a key file that the
first of them creates (mode 600) in the run directory (:func:`shared_key_file`).

This module does not read ``os.environ`` (the launcher does) and does not open
sockets (``sockets.configure_security`` installs a :class:`CurveSecurity` that every
Channel applies when it binds or connects).
"""

from __future__ import annotations

import argparse
import hmac
import logging
import os
import stat
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from asyncopd.config import ClusterConfig, ConfigError

__all__ = ["JobKey", "CurveSecurity", "job_key_for", "shared_key_file", "require_curve", "JOB_SECRET_ENV",
           "KEYGEN_COMMAND", "SHARED_KEY_NAME"]

logger = logging.getLogger(__name__)

JOB_SECRET_ENV = "ASYNCOPD_JOB_SECRET_KEY"
"""Environment variable through which the launcher hands a generated job key to its ranks."""
KEYGEN_COMMAND = "python -m asyncopd.transport.security keygen DIR"
_KEY_NAME = "asyncopd_job"
SHARED_KEY_NAME = ".asyncopd_job.key_secret"
"""File name of the key the ranks of a directly started single-node world share."""
_ZAP_DOMAIN = "asyncopd"


@dataclass(frozen=True, slots=True, repr=False)
class JobKey:
    """The job's CURVE keypair, both halves z85-encoded (40 bytes each)."""

    public: bytes
    secret: bytes

    @classmethod
    def generate(cls) -> "JobKey":
        public, secret = zmq.curve_keypair()
        return cls(public=public, secret=secret)

    @classmethod
    def from_secret(cls, secret: bytes) -> "JobKey":
        """The keypair from its secret half (the public half is derived from it)."""
        return cls(public=zmq.curve_public(secret), secret=secret)

    @classmethod
    def load(cls, path: str | Path) -> "JobKey":
        """Read a pyzmq secret certificate (``*.key_secret``); ConfigError if unusable."""
        field = f"cluster.auth_key_file={str(path)!r}"
        fix = f"Fix: create one with `{KEYGEN_COMMAND}` and copy it to every node"
        try:
            public, secret = zmq.auth.load_certificate(path)
        except OSError as exc:
            raise ConfigError(f"{field}: cannot read it ({exc}). {fix}.") from None
        except ValueError:
            raise ConfigError(f"{field}: no CURVE public-key in it (not a pyzmq certificate). {fix}.") from None
        if secret is None:
            raise ConfigError(f"{field}: holds only a public key. Fix: point it at the *.key_secret file "
                              f"next to it, or create a keypair with `{KEYGEN_COMMAND}`.")
        try:
            derived = zmq.curve_public(secret)
        except (ValueError, zmq.ZMQError):  # wrong length, or not z85
            derived = None
        if derived is None or not hmac.compare_digest(derived, public):
            raise ConfigError(f"{field}: its secret-key is garbled or does not belong to its public-key. {fix}.")
        if Path(path).stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("%s is readable by other users; whoever reads it can join the job (chmod 600 it)", path)
        return cls(public=public, secret=secret)

    def __repr__(self) -> str:  # never print the secret half
        return f"JobKey(public={self.public.decode()!r})"


def require_curve() -> None:
    """ConfigError unless this libzmq was built with CURVE."""
    if not zmq.has("curve"):
        raise ConfigError(
            f"cluster.auth resolves to 'curve' but libzmq {zmq.zmq_version()} was built without CURVE "
            "(no libsodium). Fix: install pyzmq's wheels (their bundled libzmq has CURVE), or on a network "
            "you fully trust set cluster.auth=none."
        )


def job_key_for(cluster: ClusterConfig, *, inherited_secret: str | None, num_nodes: int,
                can_generate: bool, shared_key_dir: Path | None = None) -> JobKey | None:
    """The job key this process should use, or None when the job runs without auth.

    ``inherited_secret`` is what a parent launcher handed down (None if nothing);
    ``can_generate`` is true only for the launcher that starts a single-node world
    itself, so that all its ranks share the key it makes; ``shared_key_dir`` (the run
    directory) is where the ranks of a single-node world started without that launcher
    share one (:func:`shared_key_file`).
    """
    if cluster.resolved_auth == "none":
        return None
    require_curve()
    if cluster.auth_key_file is not None:
        return JobKey.load(cluster.auth_key_file)
    if inherited_secret:
        return JobKey.from_secret(inherited_secret.encode())
    if can_generate:
        return JobKey.generate()
    if num_nodes == 1 and shared_key_dir is not None:
        return JobKey.load(shared_key_file(shared_key_dir))
    if num_nodes > 1:
        raise ConfigError(
            f"cluster.auth_key_file=None: the job spans {num_nodes} nodes and cluster.auth="
            f"{cluster.auth!r} resolves to 'curve' (cluster.host={cluster.host!r}), so every node needs the same "
            f"job key. Fix: run `{KEYGEN_COMMAND}` once, copy DIR/{_KEY_NAME}.key_secret to every node (or "
            "keep it on a shared filesystem) and pass cluster.auth_key_file=<that path> on every node."
        )
    raise ConfigError(
        f"cluster.auth_key_file=None: cluster.auth={cluster.auth!r} resolves to 'curve' "
        f"(cluster.host={cluster.host!r}) and torchrun was started directly, so no launcher made a job key "
        f"for the ranks to share. Fix: start with `python -m asyncopd.launch` (it makes one), or run "
        f"`{KEYGEN_COMMAND}` and pass cluster.auth_key_file=DIR/{_KEY_NAME}.key_secret."
    )


class _JobKeyGate:
    """ZAP credentials provider: admits the job public key only; counts the rest."""

    def __init__(self, public: bytes) -> None:
        self.public = public
        self.num_denied = 0
        self._lock = threading.Lock()  # called from the authenticator thread

    def callback(self, domain: str, client_key: bytes) -> bool:
        if hmac.compare_digest(client_key, self.public):
            return True
        with self._lock:
            self.num_denied += 1
            num_denied = self.num_denied
        if num_denied & (num_denied - 1) == 0:  # 1, 2, 4, 8, ...: a flood cannot flood the log
            logger.warning("denied a ZeroMQ peer with a foreign CURVE key %s (%d denied so far)",
                           client_key.decode(), num_denied)
        return False


class CurveSecurity:
    """The job key applied to sockets, and the ZAP gate that admits only its holders.

    Install one per process with ``sockets.configure_security``. :meth:`close` makes
    the gate admit nobody (sockets bound under this key then refuse new peers).
    """

    def __init__(self, key: JobKey) -> None:
        require_curve()
        self.key = key
        self._gate = _JobKeyGate(key.public)
        _process_authenticator().configure_curve_callback(_ZAP_DOMAIN, credentials_provider=self._gate)

    @property
    def num_denied(self) -> int:
        """Handshakes refused by the authenticator (clients with a foreign key)."""
        return self._gate.num_denied

    def apply_server(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE server for the endpoints it binds next."""
        socket.curve_secretkey = self.key.secret
        socket.curve_publickey = self.key.public
        socket.zap_domain = _ZAP_DOMAIN.encode()
        socket.curve_server = True

    def apply_client(self, socket: zmq.Socket) -> None:
        """Make ``socket`` a CURVE client of job servers for the endpoints it connects next."""
        socket.curve_server = False
        socket.curve_serverkey = self.key.public
        socket.curve_publickey = self.key.public
        socket.curve_secretkey = self.key.secret

    def close(self) -> None:
        self._gate.public = b""  # matches no key


_authenticator: ThreadAuthenticator | None = None
_authenticator_lock = threading.Lock()


def _process_authenticator() -> ThreadAuthenticator:
    """The ZAP handler of this process's ZeroMQ context, started on first use.

    It lives as long as the process: libzmq frees the ZAP endpoint asynchronously,
    so a stopped handler could not be replaced at once. Its thread is a daemon.
    """
    global _authenticator
    with _authenticator_lock:
        if _authenticator is None:
            _authenticator = ThreadAuthenticator(zmq.Context.instance())
            _authenticator.start()
        return _authenticator


def shared_key_file(directory: Path) -> Path:
    """``directory``/.asyncopd_job.key_secret: created with a new keypair (mode 600) by the
    first process to get here, read by the others, kept for later restarts.

    Creation is atomic (written aside, then hard-linked into place, which fails if the
    file exists), so ranks racing at start-up all end up with the same key. Whoever can
    read the file can join the job: it is as private as the user's own processes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SHARED_KEY_NAME
    if not path.exists():
        import tempfile

        with tempfile.TemporaryDirectory(dir=directory, prefix=".asyncopd_key_") as scratch:
            made = keygen(Path(scratch))
            try:
                os.link(made, path)
            except FileExistsError:
                pass  # another rank was first: use its key
    return path


def keygen(directory: Path) -> Path:
    """Write a new job keypair as pyzmq certificates in ``directory``; the secret one's path."""
    secret_file = directory / f"{_KEY_NAME}.key_secret"
    if secret_file.exists():
        raise FileExistsError(f"{secret_file} exists; a running job may use it. Remove it first to replace it.")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret_file.touch(mode=0o600)  # the certificate writer keeps this mode and never widens it
    _, secret = zmq.auth.create_certificates(directory, _KEY_NAME)
    return Path(secret)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncopd.transport.security",
                                     description="Manage the CURVE job key of multi-node asyncopd jobs.")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("keygen", help="write a new job keypair (pyzmq certificates) into DIR")
    make.add_argument("directory", type=Path, metavar="DIR")
    args = parser.parse_args(argv)
    try:
        secret_file = keygen(args.directory)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {secret_file} (keep it private: whoever holds it can join the job).\n"
          f"Copy it to every node and pass cluster.auth_key_file={secret_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
