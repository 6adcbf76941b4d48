"""Verifiable reward functions, by name: ``task.reward`` picks one per dataset.

A reward function grades one response text against a prompt's reference answer
and returns 1.0 (right) or 0.0 (wrong):

- ``exact_match``: the response, stripped of trailing whitespace and ``<eos>``,
  equals the answer exactly (the demo task's verifier);
- ``math_answer``: the final answer in the response (``\\boxed{...}``, a LaTeX
  expression, or the last number) equals the reference mathematically, as HF's
  ``math-verify`` decides (``1/2`` = ``0.5`` = ``\\frac{1}{2}``);
- ``none``: the dataset has no verifiable answer (prompt-only distillation);
  every reward is NaN, so reward-based objectives are refused at startup and
  held-out accuracy reads NaN.

This module grades text only; it does not tokenize, sample or know about roles.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

__all__ = ["RewardFn", "REWARDS", "get_reward", "exact_match", "math_answer", "no_reward"]

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, str], float]
"""``reward(response_text, answer) -> float``."""

_EOS_TEXT = "<eos>"


def normalize_response(response_text: str) -> str:
    """Strip what a decoder may leave after an answer: trailing whitespace and ``<eos>``."""
    text = response_text.rstrip()
    while text.endswith(_EOS_TEXT):
        text = text[: -len(_EOS_TEXT)].rstrip()
    return text


def exact_match(response_text: str, answer: str) -> float:
    return 1.0 if normalize_response(response_text) == answer else 0.0


def math_answer(response_text: str, answer: str) -> float:
    from math_verify import parse, verify

    try:
        gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
        predicted = parse(normalize_response(response_text))
        return 1.0 if gold and predicted and verify(gold, predicted) else 0.0
    except Exception:  # noqa: BLE001 - a response the parser chokes on is simply wrong
        logger.debug("math_answer: could not grade %r against %r", response_text[:200], answer, exc_info=True)
        return 0.0


def no_reward(response_text: str, answer: str) -> float:
    return math.nan


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "math_answer": math_answer,
    "none": no_reward,
}


def get_reward(name: str) -> RewardFn:
    try:
        return REWARDS[name]
    except KeyError:
        raise ValueError(f"task.reward={name!r}: no such reward function. "
                         f"Fix: use one of {sorted(REWARDS)}.") from None
