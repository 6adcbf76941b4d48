"""The typed schema of an asyncopd job, and its validation.

Hydra composes YAML from ``configs/`` (plus command-line overrides) into a plain
dict; :func:`from_dict` turns that dict into a :class:`JobConfig` once, in the
launcher, and every role receives only the typed sub-configs it needs. No
``DictConfig`` travels past the entry point.

Every field carries a docstring with its unit and effect. "Unset" is ``None``.
Errors are :class:`ConfigError` and name the field, the value received and the
fix, so that an impossible job fails before any process starts work.

This module does not load models, open sockets or touch ``os.environ``.

The schema is split by config group into the modules of this package (cluster,
model, actor, teacher, learner, run, job); every public name is imported from
``asyncopd.config``.
"""

from __future__ import annotations

from asyncopd.config._base import ConfigError
from asyncopd.config.cluster import ClusterConfig
from asyncopd.config.model import ModelSpec, ModelConfig, TaskConfig
from asyncopd.config.actor import ActorConfig
from asyncopd.config.teacher import DEFAULT_TOP_K, MAX_TOP_K, TeacherConfig
from asyncopd.config.learner import AsyncConfig, BufferConfig, LearnerConfig, LossConfig
from asyncopd.config.run import EvalConfig, RunConfig
from asyncopd.config.job import JobConfig, from_dict

__all__ = [
    "ConfigError",
    "DEFAULT_TOP_K",
    "MAX_TOP_K",
    "ClusterConfig",
    "ModelSpec",
    "ModelConfig",
    "TaskConfig",
    "ActorConfig",
    "TeacherConfig",
    "AsyncConfig",
    "BufferConfig",
    "LearnerConfig",
    "LossConfig",
    "EvalConfig",
    "RunConfig",
    "JobConfig",
    "from_dict",
]
