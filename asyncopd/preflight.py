"""Checks that run before any rank starts work, each failing with a ConfigError
that names the setting, what is wrong and the fix.

- data files (``task.train_path`` / ``task.eval_path``): every line parses, with
  ``file:line`` of the first bad one (:func:`asyncopd.tasks.jsonl.load_jsonl`);
- the run directory: creatable, writable, with room for a checkpoint;
- model directories (``model.student.path`` / ``model.teacher.path``): a path
  that does not exist is named as such, not passed on to Hugging Face (whose
  error would be "Repo id must be in the form ...").

Called by the launcher before it starts torchrun, and by every rank before it
loads anything (a job started by ``torchrun`` directly). Knows nothing about
roles.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from asyncopd.config import ConfigError, JobConfig

__all__ = ["preflight", "check_data_files", "check_run_dir", "check_model_dirs", "checkpoint_bytes_estimate"]

_MIB = 2**20
_HEADROOM_BYTES = 64 * _MIB


def preflight(cfg: JobConfig) -> None:
    """Every check of this module, cheapest first."""
    check_model_dirs(cfg)
    check_run_dir(cfg.run.run_dir, need_bytes=checkpoint_bytes_estimate(cfg))
    check_data_files(cfg)


def check_data_files(cfg: JobConfig) -> None:
    from asyncopd.tasks.jsonl import JsonlError, load_jsonl

    tokenizer = None  # "messages" lines are rendered with the student's chat template
    student = cfg.model.student.path
    if student is not None and (Path(student).expanduser() / "config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(Path(student).expanduser())
    for name in ("train_path", "eval_path"):
        path = getattr(cfg.task, name)
        if path is None:
            continue
        try:
            load_jsonl(path, tokenizer=tokenizer, require_answer=cfg.task.reward != "none")
        except JsonlError as exc:
            raise ConfigError(f"task.{name}={path!r}: {exc}") from None
        except ValueError:
            if tokenizer is not None:
                raise
            # "messages" lines and a student built later (the chat task's default): the
            # roles load the file again with its tokenizer.
            continue


def _looks_like_hub_id(path: str) -> bool:
    """"org/name" (or "name"): what Hugging Face would look up on a hub."""
    return not path.startswith(("/", ".", "~")) and path.count("/") <= 1 and "\\" not in path


def check_model_dirs(cfg: JobConfig) -> None:
    for field, path in (("model.student.path", cfg.model.student.path), ("model.teacher.path", cfg.model.teacher.path)):
        if path is None:
            continue
        local = Path(path).expanduser()
        if local.exists():
            if not local.is_dir() or not (local / "config.json").is_file():
                raise ConfigError(f"{field}={path!r} is not a Hugging Face model directory (no config.json). "
                                  "Fix: point it at a save_pretrained output directory.")
        elif not _looks_like_hub_id(path):
            raise ConfigError(f"{field}={path!r}: no such directory. Fix: check the path (a local Hugging Face "
                              "model directory; a hub id has the form org/name).")


def checkpoint_bytes_estimate(cfg: JobConfig) -> int:
    """Room one checkpoint and the export need: fp32 weights + two Adam moments
    (4x the weights' float32 size, counted from the student's files) plus the export."""
    path = cfg.model.student.path
    if path is None or not Path(path).is_dir():
        return _HEADROOM_BYTES
    weights = sum(p.stat().st_size for p in Path(path).iterdir()
                  if p.is_file() and p.suffix in (".safetensors", ".bin"))
    scale = 1 if cfg.model.student.dtype == "float32" else 2  # stored in 16 bits, trained in 32
    return 4 * scale * weights + _HEADROOM_BYTES


def check_run_dir(run_dir: Path, *, need_bytes: int) -> None:
    """``run_dir`` exists or can be made, is writable, and has ``need_bytes`` free."""
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"run directory {run_dir}: {existing} is a file. Fix: choose another run.dir/run.name.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run directory {run_dir}: {existing} is not writable by this user. Fix: choose a "
                          "writable run.dir (or fix its permissions).")
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise ConfigError(
            f"run directory {run_dir}: {free / _MIB:.0f} MiB free on its filesystem, a checkpoint of this "
            f"student needs about {need_bytes / _MIB:.0f} MiB. Fix: free space or choose a run.dir on a larger "
            "filesystem.")
