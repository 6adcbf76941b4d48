"""Prompts from JSONL files: one ``{"prompt": str, "answer": str}`` object per line,
or one chat ``{"messages": [{"role": str, "content": str}, ...]}`` per line (the
format TRL and verl users have).

A ``messages`` line is rendered into the prompt text with the student tokenizer's
chat template and ``add_generation_prompt=True`` (so generation starts in the
assistant's turn); a tokenizer without a chat template is an error naming the file.
:func:`load_jsonl` reads and validates a file. Every defect is a
:class:`JsonlError` that names ``file:line``, the problem and the fix; nothing is
dropped silently (only blank lines are skipped). Extra keys on a line are
allowed and ignored, so files carrying ids or metadata load as they are.

:class:`JsonlTask` serves those prompts through the :class:`~asyncopd.tasks.Task`
interface, graded by the verifier ``task.reward`` names (exact match on
``answer`` by default, the synthetic task's verifier). With ``task.reward=none``
(prompt-only distillation) ``answer`` may be left out. The training stream cycles through the file forever, reshuffled every
epoch from ``task.seed``. Held-out prompts come from ``task.eval_path`` or, when
only ``task.train_path`` is set, from ``task.num_eval_prompts`` lines held out of
the training file (then never trained on).

This module does not generate prompts; with only ``task.eval_path`` set the
training stream is the synthetic task's.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from asyncopd.tasks import Prompt, Task, check_shard
from asyncopd.tasks.rewards import RewardFn, exact_match, get_reward

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from asyncopd.config import TaskConfig

__all__ = ["CHAT_EVAL_PATH", "CHAT_TRAIN_PATH", "JsonlError", "JsonlTask", "chat_task_paths", "load_jsonl"]

logger = logging.getLogger(__name__)

_FORMAT = ('each line must be a JSON object {"prompt": "<text>", "answer": "<text>"} or '
           '{"messages": [{"role": "user", "content": "<text>"}], "answer": "<text>"}')


CHAT_TRAIN_PATH = Path(__file__).parent / "data" / "chat_train.jsonl"
"""The chat task's packaged training prompts (messages format, asyncopd/tasks/chat_prompts.py)."""
CHAT_EVAL_PATH = Path(__file__).parent / "data" / "chat_eval.jsonl"
"""Its held-out prompts (subjects never seen in training)."""


def chat_task_paths(cfg: TaskConfig) -> TaskConfig:
    """``cfg`` with the packaged chat prompts wherever train_path / eval_path are unset."""
    import dataclasses

    return dataclasses.replace(cfg, train_path=cfg.train_path or str(CHAT_TRAIN_PATH),
                               eval_path=cfg.eval_path or str(CHAT_EVAL_PATH))


class JsonlError(ValueError):
    """A prompt file that cannot be used; the message names file:line, problem and fix."""


def _count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def load_jsonl(
    path: str | Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_prompt_tokens: int | None = None,
    require_answer: bool = True,
) -> list[Prompt]:
    """Read every prompt of ``path``; ``Prompt.index`` is the record's position in the file.

    With ``tokenizer`` and ``max_prompt_tokens`` both given, a prompt of more than
    ``max_prompt_tokens`` tokens is an error (it could never be generated from).
    ``require_answer=False`` (no verifier, ``task.reward=none``) makes ``answer``
    optional (default ``""``); when present it must still be a string.
    """
    if max_prompt_tokens is not None and tokenizer is None:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} was given without a tokenizer. "
            "Fix: pass the student's tokenizer too, or drop max_prompt_tokens."
        )
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JsonlError(f"{path}: cannot read the prompt file ({exc}). Fix: point at a readable JSONL file.") from exc
    prompts: list[Prompt] = []
    for lineno, line_bytes in enumerate(raw.splitlines(), start=1):
        where = f"{path}:{lineno}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JsonlError(f"{where}: not valid UTF-8 ({exc}). Fix: re-encode the file as UTF-8.") from exc
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JsonlError(
                f"{where}: malformed JSON ({exc.msg} at column {exc.colno}). Fix: {_FORMAT}."
            ) from exc
        if not isinstance(record, dict):
            raise JsonlError(f"{where}: expected a JSON object, got {type(record).__name__}. Fix: {_FORMAT}.")
        if not require_answer:
            record.setdefault("answer", "")
        if "messages" in record:
            record["prompt"] = _render_messages(record, where, tokenizer)
        for key in ("prompt", "answer"):
            if key not in record:
                raise JsonlError(f'{where}: missing field "{key}". Fix: {_FORMAT} '
                                 '(or set task.reward=none to distill on prompts alone).')
            if not isinstance(record[key], str):
                raise JsonlError(
                    f'{where}: field "{key}" must be a string, got {type(record[key]).__name__} '
                    f"({record[key]!r}). Fix: quote it, e.g. \"{key}\": \"{record[key]}\"."
                )
        text, answer = record["prompt"], record["answer"]
        if not text:
            raise JsonlError(f'{where}: empty "prompt". Fix: remove the line or give it a prompt.')
        if require_answer and not answer.strip():
            raise JsonlError(
                f'{where}: empty "answer"; the verifier would have nothing to match. '
                "Fix: remove the line or give it the exact expected answer."
            )
        if max_prompt_tokens is not None:
            assert tokenizer is not None
            num_tokens = _count_tokens(tokenizer, text)
            if num_tokens > max_prompt_tokens:
                raise JsonlError(
                    f'{where}: "prompt" is {num_tokens} tokens, more than max_prompt_tokens='
                    f"{max_prompt_tokens}. Fix: shorten or remove the prompt, or raise "
                    "actor.max_model_len (prompt budget = max_model_len - max_new_tokens)."
                )
        prompts.append(Prompt(text=text, answer=answer, index=len(prompts)))
    if not prompts:
        raise JsonlError(f"{path}: the file holds no prompts. Fix: {_FORMAT}, one per line.")
    return prompts


def _render_messages(record: dict, where: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
    """The prompt text of a ``messages`` line: its chat rendered for generation."""
    messages = record["messages"]
    if "prompt" in record:
        raise JsonlError(f'{where}: both "prompt" and "messages"; which one is the prompt is ambiguous. '
                         'Fix: keep one of them.')
    if not isinstance(messages, list) or not messages:
        raise JsonlError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} '
                         f"objects, got {messages!r:.80}. Fix: {_FORMAT}.")
    for position, message in enumerate(messages):
        if (not isinstance(message, dict) or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)):
            raise JsonlError(f'{where}: messages[{position}] = {message!r:.80} is not {{"role": str, '
                             f'"content": str}}. Fix: {_FORMAT}.')
    if messages[-1]["role"] == "assistant":
        raise JsonlError(f'{where}: the last message is the assistant\'s; the student would be asked to '
                         "continue after its own finished turn. Fix: end each conversation with the user's "
                         "(or system's) message that the response should answer.")
    if tokenizer is None:
        raise ValueError(f'{where}: "messages" lines are rendered with the student tokenizer\'s chat template, '
                         "and none was given. Fix: pass tokenizer= (the student's) to load_jsonl / load_task.")
    if not getattr(tokenizer, "chat_template", None):
        raise JsonlError(f'{where}: a "messages" line, but the student tokenizer '
                         f"({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}) has no chat template. "
                         'Fix: use a chat (instruct) model, or write plain {"prompt": "<text>"} lines.')
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja errors: the template rejected this conversation
        raise JsonlError(f"{where}: the student's chat template rejected these messages ({exc}). "
                         "Fix: check the roles and their order against the model's chat format.") from exc
    return str(text)


class JsonlTask:
    """A :class:`~asyncopd.tasks.Task` over prompt lists (normally read from JSONL files)."""

    def __init__(self, train: list[Prompt] | None, eval_: list[Prompt], *, seed: int,
                 synthetic: Task | None = None, reward: RewardFn = exact_match, replicate: int = 0) -> None:
        """``train=None`` takes the training stream from ``synthetic``; ``reward`` grades responses."""
        if train is None and synthetic is None:
            raise ValueError("JsonlTask needs training prompts or a synthetic task to draw them from.")
        if train is not None and not train:
            raise ValueError("JsonlTask got an empty training list. Fix: give it at least one prompt.")
        self._train = train
        self._eval = [Prompt(text=p.text, answer=p.answer, index=i) for i, p in enumerate(eval_)]
        self._synthetic = synthetic
        self._seed = seed
        self._replicate = replicate
        self._reward = reward
        self._epoch_order: tuple[int, list[int]] | None = None

    @classmethod
    def from_config(
        cls,
        cfg: TaskConfig,
        *,
        synthetic: Task | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        max_prompt_tokens: int | None = None,
        replicate: int = 0,
    ) -> JsonlTask:
        def load(path: str) -> list[Prompt]:
            return load_jsonl(path, tokenizer=tokenizer, max_prompt_tokens=max_prompt_tokens,
                              require_answer=cfg.reward != "none")

        train = load(cfg.train_path) if cfg.train_path is not None else None
        if cfg.eval_path is not None:
            eval_ = load(cfg.eval_path)
            if len(eval_) > cfg.num_eval_prompts:
                logger.warning(
                    "task.eval_path=%s holds %d prompts; evaluating the first task.num_eval_prompts=%d "
                    "(raise task.num_eval_prompts to use them all)",
                    cfg.eval_path, len(eval_), cfg.num_eval_prompts,
                )
                eval_ = eval_[: cfg.num_eval_prompts]
        elif train is not None:
            train, eval_ = _hold_out(train, cfg)
        else:
            raise ValueError("JsonlTask.from_config needs task.train_path or task.eval_path set.")
        if train is not None:
            overlap = {p.text for p in train} & {p.text for p in eval_}
            if overlap:
                logger.warning(
                    "%d held-out prompts also appear in task.train_path=%s; held-out accuracy will "
                    "overstate generalisation (e.g. %r)", len(overlap), cfg.train_path, next(iter(overlap)),
                )
        logger.info(
            "JSONL task: %s training prompts, %d held-out prompts",
            len(train) if train is not None else "synthetic", len(eval_),
        )
        return cls(train, eval_, seed=cfg.seed, synthetic=synthetic, reward=get_reward(cfg.reward),
                   replicate=replicate)

    def _order(self, epoch: int) -> list[int]:
        assert self._train is not None
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = list(range(len(self._train)))
            key = f"jsonl-train:{self._seed}" + (f":r{self._replicate}" if self._replicate else "")
            random.Random(f"{key}:{epoch}").shuffle(order)
            self._epoch_order = (epoch, order)
        return self._epoch_order[1]

    def train_prompts(self, shard: int, num_shards: int, start: int = 0) -> Iterator[Prompt]:
        check_shard(shard, num_shards, start)
        if self._train is None:
            assert self._synthetic is not None
            yield from self._synthetic.train_prompts(shard, num_shards, start)
            return
        num_train = len(self._train)
        index = shard + num_shards * start
        while True:
            record = self._train[self._order(index // num_train)[index % num_train]]
            yield Prompt(text=record.text, answer=record.answer, index=index)
            index += num_shards

    def eval_prompts(self) -> list[Prompt]:
        return list(self._eval)

    def reward(self, prompt: Prompt, response_text: str) -> float:
        return self._reward(response_text, prompt.answer)


def _hold_out(train: list[Prompt], cfg: TaskConfig) -> tuple[list[Prompt], list[Prompt]]:
    """Split ``cfg.num_eval_prompts`` seeded-random prompts off the training file."""
    if len(train) <= cfg.num_eval_prompts:
        raise JsonlError(
            f"{cfg.train_path}: {len(train)} prompts, not more than task.num_eval_prompts="
            f"{cfg.num_eval_prompts}, so none would be left to train on after holding out the "
            "evaluation set. Fix: set task.eval_path to a separate file or lower task.num_eval_prompts."
        )
    chosen = set(random.Random(f"jsonl-holdout:{cfg.seed}").sample(range(len(train)), cfg.num_eval_prompts))
    logger.info(
        "task.eval_path is unset: holding out %d of the %d prompts of %s for evaluation",
        cfg.num_eval_prompts, len(train), cfg.train_path,
    )
    kept = [p for p in train if p.index not in chosen]
    held = [p for p in train if p.index in chosen]
    return kept, held
