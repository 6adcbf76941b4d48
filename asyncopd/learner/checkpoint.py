"""Learner checkpoints (DCP) and the final Hugging Face export.

Layout of a run's checkpoints::

    run_dir/checkpoints/step_<N>/
        .metadata, __<rank>_<i>.distcp   model + optimiser, sharded (torch.distributed.checkpoint)
        extra.json                       the caller's JSON-able state (policy_version, cursors, RNG)
        <name>                           the caller's other files (bytes), e.g. buffered samples
        COMPLETE                         written last; a directory without it is ignored

A crash mid-save leaves ``step_<N>`` without ``COMPLETE``, which
:func:`latest_checkpoint` skips and a later save of the same step overwrites.
DCP reshards on load, so a checkpoint saved by L ranks loads on any number.

All functions except :func:`latest_checkpoint` and :func:`checkpoint_dir` are
collective over the learner ranks (the default process group) when
torch.distributed is initialised; without it they work on one process. The
directory must be on a filesystem every learner rank sees.

This module does not decide when to checkpoint, nor what goes into ``extra``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from huggingface_hub import save_torch_state_dict
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

__all__ = ["checkpoint_dir", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "export_hf"]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
EXTRA_FILE = "extra.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Files of a source model directory that an export must not copy (weights are rewritten).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _write_atomic(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(text.encode() if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint after optimiser step ``step`` lives."""
    return Path(run_dir) / "checkpoints" / f"step_{step}"


def save_checkpoint(ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], files: dict[str, bytes] | None = None) -> Path:
    """Save model + optimiser (sharded, DCP), ``extra`` (JSON) and ``files`` (name ->
    bytes), the last two from rank 0.

    An existing directory of the same name is replaced. Returns ``ckpt_dir``
    once it is complete on disk (all ranks return after the marker is written).
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        extra_text = json.dumps(extra, indent=2, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"checkpoint extra must be JSON-able ({exc}); convert tensors/arrays to lists "
                        "and bytes to base64 before saving") from exc
    if _rank() == 0:
        if ckpt_dir.exists():
            logger.warning("replacing existing checkpoint directory %s", ckpt_dir)
            (ckpt_dir / COMPLETE_MARKER).unlink(missing_ok=True)
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(ckpt_dir))
    _barrier()  # every rank's shard is on disk
    if _rank() == 0:
        for name, data in (files or {}).items():
            _write_atomic(ckpt_dir / name, data)
        _write_atomic(ckpt_dir / EXTRA_FILE, extra_text)
        _write_atomic(ckpt_dir / COMPLETE_MARKER, "")
    _barrier()
    logger.info("saved checkpoint %s", ckpt_dir)
    return ckpt_dir


def load_checkpoint(ckpt_dir: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model + optimiser state in place (resharding as needed); return ``extra``.

    Build ``model`` (sharded the same way as for training) and ``optimizer``
    first; the optimiser may be fresh (never stepped).
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / COMPLETE_MARKER).is_file():
        raise FileNotFoundError(f"{ckpt_dir} is not a complete checkpoint (no {COMPLETE_MARKER} marker: "
                                "missing or interrupted while saving); resume from latest_checkpoint(run_dir) "
                                "or another step_<N> directory")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(ckpt_dir))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = json.loads((ckpt_dir / EXTRA_FILE).read_text())
    logger.info("loaded checkpoint %s", ckpt_dir)
    return extra


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete ``step_<N>`` checkpoint with the largest N, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / COMPLETE_MARKER).is_file():
            step = int(match.group(1))
            if best is None or step > best[0]:
                best = (step, path)
    return best[1] if best else None


def _tied_output_name(model: nn.Module) -> str | None:
    """FQN of the output embedding when it shares its weight with the input one."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return None
    for name, _ in model.named_parameters(remove_duplicate=False):
        if name.endswith("lm_head.weight"):
            return name
    return "lm_head.weight"


def _copy_model_files(source_dir: Path, out_dir: Path, dtype: torch.dtype | None) -> None:
    """Copy config/tokenizer files (everything but weights) from ``source_dir``."""
    for path in source_dir.iterdir():
        if not path.is_file() or path.name.endswith(_WEIGHT_SUFFIXES) or path.name in _WEIGHT_INDEXES:
            continue
        shutil.copy2(path, out_dir / path.name)
    config_path = out_dir / "config.json"
    if dtype is not None and config_path.is_file():
        config = json.loads(config_path.read_text())
        dtype_name = str(dtype).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = dtype_name
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_hf(model: nn.Module, out_dir: str | Path, source_dir: str | Path,
              dtype: torch.dtype | None = None) -> Path | None:
    """Write the (sharded) model as a Hugging Face directory on rank 0.

    The full state dict is gathered to rank 0 on CPU; weights are written as
    safetensors (sharded past 5 GB) with the tied ``lm_head.weight`` left out as
    ``save_pretrained`` does; config, generation config and tokenizer files are
    copied from ``source_dir`` (the student it was loaded from). ``dtype``
    casts the weights (and updates config.json); None keeps the training dtype.
    The directory is written as ``<out_dir>.tmp`` and renamed when complete.
    Collective; returns ``out_dir`` on rank 0 and None elsewhere.
    """
    out_dir, source_dir = Path(out_dir), Path(source_dir)
    if not (source_dir / "config.json").is_file():
        raise FileNotFoundError(f"export_hf source_dir {str(source_dir)!r} has no config.json; pass the "
                                "student's Hugging Face directory (model.student.path)")
    if _distributed():
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)
    else:
        state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if _rank() != 0:
        _barrier()
        return None
    tied = _tied_output_name(model)
    if tied is not None:
        state.pop(tied, None)
    if dtype is not None:
        state = {name: tensor.to(dtype) for name, tensor in state.items()}
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    save_torch_state_dict(state, tmp_dir, metadata={"format": "pt"})
    _copy_model_files(source_dir, tmp_dir, dtype)
    for path in tmp_dir.iterdir():
        path.chmod(0o644)  # the weights are written 0600; a server may run as another user
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp_dir, out_dir)
    logger.info("exported Hugging Face model to %s", out_dir)
    _barrier()
    return out_dir
