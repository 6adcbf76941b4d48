"""Thread budgets: how many torch / OpenMP compute threads each rank gets.

``cluster.learner_threads``, ``cluster.actor_threads`` and ``cluster.teacher_threads``
are numbers; ``cluster.learner_threads`` may also be ``auto``: the cores this process
may run on (its CPU affinity) divided among the learner ranks of its node, at least 1.

Why the learner, and why all the cores: on the 2-core machine with the teacher inside
the learner (``configs/smollm2.yaml``) the learner is busy the whole step while the
actor generates a batch in a fraction of it (trace: learner busy 0.99, actor 0.15), so
a learner that spreads its step over both cores uses the core the actor leaves idle;
the actor's few threads then share a core with it while they generate. Measured
(``bench/results/vs_trl.txt``, idle machine): 71.8 s/step against TRL's 91.7 on SmolLM2. On the three-role demo the actor is busy most of the step
and the default stays 1 thread per role.

When the threads of a node's ranks add up to more than its cores and one rank has
several, OpenMP threads that
spin while waiting (libgomp's default) burn the core another rank needs;
:func:`thread_environment` then asks for passive waiting (``OMP_WAIT_POLICY=PASSIVE``)
unless the user set it.

The launcher calls :func:`rank_threads` and :func:`thread_environment` in every rank
before torch is imported. Pure: no torch, no ``os.environ`` writes.
"""

from __future__ import annotations

import os

from asyncopd.config import ClusterConfig

__all__ = ["available_cores", "rank_threads", "node_threads", "thread_environment"]


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask; ``os.cpu_count`` elsewhere)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _ranks_on_node(cluster: ClusterConfig, node: int, procs_per_node: int) -> dict[str, int]:
    """How many ranks of each role run on ``node`` (ranks are assigned learner, actor, teacher)."""
    counts = {"learner": 0, "actor": 0, "teacher": 0}
    world = cluster.learners + cluster.actors + cluster.teachers
    for rank in range(node * procs_per_node, min((node + 1) * procs_per_node, world)):
        counts[cluster.role_of(rank)[0]] += 1
    return counts


def rank_threads(cluster: ClusterConfig, role: str, *, node: int, procs_per_node: int, cores: int) -> int:
    """The compute threads of one rank of ``role`` on ``node`` of a job with ``procs_per_node``
    ranks per node, on a machine with ``cores`` usable cores."""
    value = {"learner": cluster.learner_threads, "actor": cluster.actor_threads,
             "teacher": cluster.teacher_threads}[role]
    if value != "auto":
        return int(value)
    learners = _ranks_on_node(cluster, node, procs_per_node)["learner"]
    return max(1, cores // max(learners, 1))


def node_threads(cluster: ClusterConfig, *, node: int, procs_per_node: int, cores: int) -> int:
    """The compute threads of all ranks on ``node`` together."""
    counts = _ranks_on_node(cluster, node, procs_per_node)
    return sum(n * rank_threads(cluster, role, node=node, procs_per_node=procs_per_node, cores=cores)
               for role, n in counts.items())


def thread_environment(cluster: ClusterConfig, *, node: int, procs_per_node: int, cores: int,
                       environ: dict[str, str] | None = None) -> dict[str, str]:
    """Variables to set before torch is imported: ``OMP_WAIT_POLICY=PASSIVE`` when the node's
    ranks ask for more threads than it has cores, unless ``environ`` already sets it."""
    environ = os.environ if environ is None else environ
    if "OMP_WAIT_POLICY" in environ:
        return {}
    counts = _ranks_on_node(cluster, node, procs_per_node)
    widest = max(rank_threads(cluster, role, node=node, procs_per_node=procs_per_node, cores=cores)
                 for role, n in counts.items() if n)
    # A one-thread process never waits at an OpenMP barrier: only a wider one can spin.
    if widest > 1 and node_threads(cluster, node=node, procs_per_node=procs_per_node, cores=cores) > cores:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {}
