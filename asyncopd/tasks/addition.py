"""The synthetic addition task: ``"{a}+{b}="`` -> ``"{a+b}"``.

Each operand first draws its number of digits uniformly from 1..``task.max_digits``
and then a value uniformly among the numbers with that many digits (0..9 for one
digit), so short and long problems are equally common. The model's response is
the decimal sum followed by ``<eos>``.

The held-out set is ``task.num_eval_prompts`` distinct problems drawn from their
own seeded stream; the training stream skips every problem in it, so evaluation
never sees a training problem. Training prompt ``i`` is a pure function of
``(task.seed, replicate, i)``, so any shard and any resume cursor are reached
without replaying the stream; ``replicate`` (``run.seed``) draws another training
stream and leaves the held-out set alone.

This module does not tokenize or train; :mod:`asyncopd.tasks.demo` trains the demo
models on :func:`sample_operands`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np

from asyncopd.config import TaskConfig
from asyncopd.tasks import Prompt, check_shard
from asyncopd.tasks.rewards import get_reward

__all__ = ["AdditionTask", "format_prompt", "sample_operands"]


def format_prompt(a: int, b: int, index: int) -> Prompt:
    return Prompt(text=f"{a}+{b}=", answer=str(a + b), index=index)


def _draw_operand(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def sample_operands(rng: np.random.Generator, n: int, max_digits: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` operand pairs (int64 arrays ``a``, ``b``) from the task's distribution, vectorised."""

    def operands() -> np.ndarray:
        digits = rng.integers(1, max_digits + 1, size=n)
        low = np.where(digits == 1, 0, 10 ** (digits - 1))
        return rng.integers(low, 10**digits)

    return operands(), operands()


class AdditionTask:
    """The :class:`~asyncopd.tasks.Task` of multi-digit addition."""

    def __init__(self, cfg: TaskConfig, *, replicate: int = 0) -> None:
        self.max_digits = cfg.max_digits
        self.seed = cfg.seed
        # Replicate 0 keeps the stream the task had before replicates existed.
        self._train_key = f"addition-train:{cfg.seed}" + (f":r{replicate}" if replicate else "")
        self._reward = get_reward(cfg.reward)
        num_problems = (10**cfg.max_digits) ** 2
        if cfg.num_eval_prompts > num_problems // 2:
            raise ValueError(
                f"task.num_eval_prompts={cfg.num_eval_prompts}: more than half of the "
                f"{num_problems} distinct problems with task.max_digits={cfg.max_digits}, which "
                "would leave too little to train on. Fix: lower task.num_eval_prompts to at most "
                f"{num_problems // 2} or raise task.max_digits."
            )
        rng = random.Random(f"addition-eval:{cfg.seed}:{cfg.max_digits}")
        pairs: dict[tuple[int, int], None] = {}  # insertion-ordered set
        while len(pairs) < cfg.num_eval_prompts:
            pairs[(_draw_operand(rng, self.max_digits), _draw_operand(rng, self.max_digits))] = None
        self._eval = [format_prompt(a, b, i) for i, (a, b) in enumerate(pairs)]
        self._eval_keys = np.array(sorted(self._key(a, b) for a, b in pairs), dtype=np.int64)
        self._eval_set = frozenset(pairs)

    def _key(self, a: int | np.ndarray, b: int | np.ndarray) -> int | np.ndarray:
        return a * 10**self.max_digits + b

    def is_held_out(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Boolean mask of the pairs that belong to the held-out set (vectorised)."""
        return np.isin(self._key(a, b), self._eval_keys)

    def train_prompt(self, index: int) -> Prompt:
        """Training prompt number ``index`` of the global stream (a pure function of seed, replicate, index)."""
        rng = random.Random(f"{self._train_key}:{index}")
        while True:
            a, b = _draw_operand(rng, self.max_digits), _draw_operand(rng, self.max_digits)
            if (a, b) not in self._eval_set:
                return format_prompt(a, b, index)

    def train_prompts(self, shard: int, num_shards: int, start: int = 0) -> Iterator[Prompt]:
        check_shard(shard, num_shards, start)
        index = shard + num_shards * start
        while True:
            yield self.train_prompt(index)
            index += num_shards

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval)

    def reward(self, prompt: Prompt, response_text: str) -> float:
        return self._reward(response_text, prompt.answer)
