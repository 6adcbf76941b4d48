"""Every seed of a job, derived from its settings and the replicate seed ``run.seed``.

A job has three random streams that differ between replicates of one experiment:

- the training prompts (their order, and for the synthetic task the problems
  themselves): ``task.seed`` and the replicate seed;
- the actors' sampling: ``actor.seed`` mixed with the replicate seed (each actor
  then offsets it by its index, each request by its sequence number);
- the learner's torch RNG (``learner.seed`` mixed with it; the student is loaded
  from disk, so nothing else in the learner draws random numbers today).

``run.seed`` moves all three at once and moves nothing else: the held-out prompts
and the (cached) demo models depend on ``task.seed`` only, so every replicate of a
sweep is evaluated on the same prompts and starts from the same student. With
``run.seed=0`` each stream is exactly what it was before replicates existed.

Pure functions; no RNG is created or seeded here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from asyncopd.config import JobConfig

__all__ = ["JobSeeds", "job_seeds", "mix_seed"]


def mix_seed(base: int, replicate: int, stream: str) -> int:
    """``base`` for replicate 0, else a 31-bit seed hashed from (stream, base, replicate)."""
    if replicate == 0:
        return base
    digest = hashlib.sha256(f"{stream}:{base}:{replicate}".encode()).digest()
    return int.from_bytes(digest[:4], "little") % (2**31)


@dataclass(frozen=True, slots=True)
class JobSeeds:
    """The seeds one job uses."""

    prompt_order: int
    """Replicate index of the training-prompt stream (0 = the task's own stream)."""
    actor: int
    """Base seed of the actors' samplers (actor i's engine gets actor + i)."""
    learner: int
    """torch.manual_seed of every learner rank."""


def job_seeds(cfg: JobConfig) -> JobSeeds:
    replicate = cfg.run.seed
    return JobSeeds(prompt_order=replicate, actor=mix_seed(cfg.actor.seed, replicate, "actor"),
                    learner=mix_seed(cfg.learner.seed, replicate, "learner"))
