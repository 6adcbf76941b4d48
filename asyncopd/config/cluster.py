"""``cluster``: how many ranks of each role, on which devices and hosts.

Part of :mod:`asyncopd.config` (import from there).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

from asyncopd.config._base import ConfigError, _check_positive, _fail


@dataclass(kw_only=True, slots=True)
class ClusterConfig:
    """How the torchrun world is split into roles (ranks are assigned in this order)."""

    learners: int = 1
    """Number of learner ranks (ranks [0, learners)); they form one FSDP2 group."""
    actors: int = 1
    """Number of actor ranks, one vLLM engine each."""
    teachers: int = 1
    """Number of teacher-pool ranks, one scorer each. 0 exactly when
    teacher.backend=colocated (the teacher then runs inside every learner rank)."""
    host: str = "127.0.0.1"
    """Address every role binds its ZeroMQ sockets to and advertises. Loopback for
    single-node jobs; set to this node's reachable address for multi-node jobs."""
    learner_threads: int | Literal["auto"] = 1
    """torch intra-op threads per learner process. ``auto``: this node's cores (CPU
    affinity) divided among its learner ranks, at least 1 -- for jobs whose learner is
    the bottleneck (a colocated teacher) and leaves the actor's core idle most of the
    step; the threads then share that core with the actor. See asyncopd/threads.py."""
    actor_threads: int = 1
    """torch/OpenMP threads for each actor's vLLM engine."""
    teacher_threads: int = 1
    """torch intra-op threads per teacher process."""
    startup_timeout_s: float = 900.0
    """Seconds a role waits for its peers to publish their endpoints before failing."""
    auth: Literal["auto", "curve", "none"] = "auto"
    """ZeroMQ security. ``curve``: every socket is authenticated and encrypted with the
    job key (ZeroMQ CURVE), so only holders of the key can connect, send rollouts or
    control messages. ``none``: plain TCP: any process that reaches ``host`` (on
    loopback: any local process) can feed the job or stop it; only for a machine and
    network you fully trust. ``auto``: ``curve``, on loopback too (measured cost in the
    README's security section)."""
    auth_key_file: str | None = None
    """The job key: a pyzmq CURVE secret certificate (``*.key_secret``, made by
    ``python -m asyncopd.transport.security keygen DIR``), the same file on every node.
    Used when ``auth`` resolves to ``curve``; required then for multi-node jobs. None:
    ``python -m asyncopd.launch`` makes a key in memory for its single-node job, and the
    ranks of a single-node ``torchrun`` started directly share
    ``<run dir>/.asyncopd_job.key_secret`` (mode 600, made by the first of them)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the roles run. "auto": on the node's GPUs when any is visible
    (CUDA_VISIBLE_DEVICES, else nvidia-smi), else on the CPU. "cuda" fails at start-up
    when no GPU is visible; "cpu" ignores GPUs. See asyncopd/placement.py."""
    gpus_per_actor: int = 1
    """GPUs of each actor's vLLM engine (its tensor-parallel size) on a GPU node."""
    gpus_per_teacher: int = 1
    """GPUs of each teacher rank (the tensor-parallel size of a teacher.backend=vllm
    engine; the hf backend uses one)."""

    def __post_init__(self) -> None:
        _check_positive("cluster", self, "learners", "actors")
        _check_positive("cluster", self, "teachers", allow_zero=True)
        _check_positive("cluster", self, "gpus_per_actor", "gpus_per_teacher")
        _check_positive("cluster", self, "actor_threads", "teacher_threads")
        if self.learner_threads != "auto":
            _check_positive("cluster", self, "learner_threads")
        _check_positive("cluster", self, "startup_timeout_s")

    @property
    def host_is_loopback(self) -> bool:
        """Whether ``host`` is reachable from this machine only (a host name counts as not)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def resolved_auth(self) -> Literal["curve", "none"]:
        """``auth`` with ``auto`` decided: ``curve`` (loopback is no protection against
        other local processes)."""
        return "curve" if self.auth == "auto" else self.auth

    @property
    def world_size(self) -> int:
        return self.learners + self.actors + self.teachers

    def role_of(self, rank: int) -> tuple[Literal["learner", "actor", "teacher"], int]:
        """Map a global rank to (role, index within that role)."""
        if rank < self.learners:
            return "learner", rank
        if rank < self.learners + self.actors:
            return "actor", rank - self.learners
        if rank < self.world_size:
            return "teacher", rank - self.learners - self.actors
        raise ConfigError(
            f"rank {rank} is outside cluster.learners+actors+teachers={self.world_size}. "
            "Fix: start torchrun with --nproc-per-node equal to that sum."
        )

    def check_num_nodes(self, num_nodes: int) -> None:
        """Peers on other nodes cannot reach a loopback address."""
        if num_nodes > 1 and self.host_is_loopback:
            _fail("cluster.host", self.host, f"a loopback address, but the job spans {num_nodes} nodes",
                  "pass each node's reachable address as cluster.host=<address> on that node's command line")

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise ConfigError(
                f"WORLD_SIZE={world_size} but cluster.learners+cluster.actors+cluster.teachers="
                f"{self.learners}+{self.actors}+{self.teachers}={self.world_size}. Fix: start "
                f"torchrun with --nproc-per-node={self.world_size} (or run `python -m asyncopd.launch`, "
                "which does it for you), or change cluster.* to add up to the world size."
            )
