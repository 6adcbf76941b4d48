"""Tasks: where prompts come from and how an answer is graded.

A :class:`Task` owns three things: an infinite, deterministic, shardable stream of
training prompts (each actor draws its own disjoint shard), a fixed held-out list
of evaluation prompts (disjoint from the training stream), and the verifier
:meth:`Task.reward` (1.0 for an exactly right answer, else 0.0).
:func:`load_task` builds the task a :class:`~asyncopd.config.TaskConfig` names:
the synthetic addition task (:mod:`asyncopd.tasks.addition`) or, when
``task.train_path`` / ``task.eval_path`` are set, prompts read from JSONL files
(:mod:`asyncopd.tasks.jsonl`). The verifier is named by ``task.reward``
(:mod:`asyncopd.tasks.rewards`).

This package does not tokenize for the engine, sample, or score; it hands out
text and grades text. The demo teacher/student models of the synthetic task live
in :mod:`asyncopd.tasks.demo`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from asyncopd.tasks.rewards import normalize_response

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from asyncopd.config import TaskConfig

__all__ = ["Prompt", "Task", "load_task", "normalize_response", "check_shard"]


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt and its reference answer."""

    text: str
    """What the model is conditioned on, e.g. ``"12+345="``."""
    answer: str
    """The exact expected response text, without end-of-sequence, e.g. ``"357"``."""
    index: int
    """Training prompts: the position in the task's global stream (unique within a job;
    shard ``s`` of ``n`` holds indices ``s, s + n, s + 2n, ...``). Evaluation prompts:
    the position in :meth:`Task.eval_prompts`."""


@runtime_checkable
class Task(Protocol):
    """What the actors and the evaluator need from a task."""

    def train_prompts(self, shard: int, num_shards: int, start: int = 0) -> Iterator[Prompt]:
        """Infinite stream of shard ``shard`` of ``num_shards`` (disjoint across shards,
        identical on every call with the same config). ``start`` is the number of this
        shard's prompts already consumed (a resumed job passes its saved cursor); the
        k-th prompt yielded has ``index == shard + num_shards * (start + k)``."""
        ...

    def eval_prompts(self) -> list[Prompt]:
        """The held-out prompts (``task.num_eval_prompts`` of them), never in the train stream."""
        ...

    def reward(self, prompt: Prompt, response_text: str) -> float:
        """The configured verifier (``task.reward``, :mod:`asyncopd.tasks.rewards`) on
        ``response_text`` against ``prompt.answer``: 1.0 right, 0.0 wrong, NaN unverifiable."""
        ...


def check_shard(shard: int, num_shards: int, start: int) -> None:
    """Raise ValueError naming the bad argument unless ``0 <= shard < num_shards`` and ``start >= 0``."""
    if num_shards < 1:
        raise ValueError(f"num_shards={num_shards}: must be >= 1. Fix: pass the number of actors.")
    if not 0 <= shard < num_shards:
        raise ValueError(
            f"shard={shard}: must be in [0, num_shards={num_shards}). Fix: pass the actor index."
        )
    if start < 0:
        raise ValueError(f"start={start}: must be >= 0. Fix: pass 0 or a saved prompt cursor.")


def load_task(
    cfg: TaskConfig,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_prompt_tokens: int | None = None,
    replicate: int = 0,
) -> Task:
    """Build the task ``cfg`` describes.

    ``tokenizer`` and ``max_prompt_tokens`` only matter for JSONL prompts: with both
    given, a prompt longer than ``max_prompt_tokens`` tokens is a load error naming
    its file and line (rather than a failure deep inside the engine). ``replicate``
    (``run.seed``) selects another training-prompt stream (order, and the synthetic
    problems); the held-out prompts do not depend on it.
    """
    from asyncopd.tasks.addition import AdditionTask

    if cfg.name == "chat":
        from asyncopd.tasks.jsonl import JsonlTask, chat_task_paths

        return JsonlTask.from_config(chat_task_paths(cfg), tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens,
                                     replicate=replicate)
    if cfg.name != "addition":
        raise ValueError(f"task.name={cfg.name!r}: unknown task. Fix: use task.name=addition or chat.")
    synthetic = AdditionTask(cfg, replicate=replicate)
    if cfg.train_path is None and cfg.eval_path is None:
        return synthetic

    from asyncopd.tasks.jsonl import JsonlTask

    return JsonlTask.from_config(
        cfg, synthetic=synthetic, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens, replicate=replicate
    )
