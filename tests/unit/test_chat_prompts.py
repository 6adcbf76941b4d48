"""messages-format JSONL (rendered with the student's chat template) and the chat task's packaged prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asyncopd.config import ConfigError, TaskConfig
from asyncopd.tasks import load_task
from asyncopd.tasks.chat_prompts import NUM_EVAL, NUM_TRAIN, generate
from asyncopd.tasks.jsonl import CHAT_EVAL_PATH, CHAT_TRAIN_PATH, JsonlError, load_jsonl
from asyncopd.tasks.tokenizer import build_char_tokenizer

# A ChatML-like template small enough for the character tokenizer's alphabet.
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture()
def chat_tokenizer():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def write(path: Path, *records: object) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def user(text: str, **extra: object) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


def test_messages_are_rendered_with_the_generation_prompt(tmp_path, chat_tokenizer) -> None:
    path = write(tmp_path / "p.jsonl",
                 {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+2="}],
                  "answer": "3"},
                 {"prompt": "4+5=", "answer": "9"})  # formats may be mixed
    prompts = load_jsonl(path, tokenizer=chat_tokenizer)
    assert [p.text for p in prompts] == ["[system]be brief\n[user]1+2=\n[assistant]", "4+5="]
    assert [p.answer for p in prompts] == ["3", "9"]


def test_rendered_length_is_what_the_limit_checks(tmp_path, chat_tokenizer) -> None:
    path = write(tmp_path / "p.jsonl", user("1+2="))  # "[user]1+2=\n[assistant]" is 22 characters
    assert load_jsonl(path, tokenizer=chat_tokenizer, max_prompt_tokens=22, require_answer=False)
    with pytest.raises(JsonlError, match=r"p.jsonl:1: \"prompt\" is 22 tokens, more than max_prompt_tokens=21"):
        load_jsonl(path, tokenizer=chat_tokenizer, max_prompt_tokens=21, require_answer=False)


@pytest.mark.parametrize(("line", "message"), [
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": "hi"}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "user"}]}, r"messages\[0\] = .* is not"),
    ({"messages": [{"role": "user", "content": 3}]}, r"messages\[0\] = .* is not"),
    ({"messages": [{"role": "user", "content": "a"}, "b"]}, r"messages\[1\] = 'b' is not"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "the last message is the assistant's"),
    ({"messages": [{"role": "user", "content": "a"}], "prompt": "a"}, 'both "prompt" and "messages"'),
    ({"messages": [{"role": "user", "content": "a"}], "answer": 3}, 'field "answer" must be a string'),
])
def test_malformed_messages_name_file_and_line(tmp_path, chat_tokenizer, line, message) -> None:
    path = write(tmp_path / "bad.jsonl", user("ok"), line)
    with pytest.raises(JsonlError, match=rf"bad.jsonl:2: .*{message}"):
        load_jsonl(path, tokenizer=chat_tokenizer, require_answer=False)


def test_a_tokenizer_without_chat_template_is_refused(tmp_path) -> None:
    path = write(tmp_path / "p.jsonl", user("1+2="))
    with pytest.raises(JsonlError, match=r"p.jsonl:1: .*has no chat template. Fix: use a chat"):
        load_jsonl(path, tokenizer=build_char_tokenizer(), require_answer=False)
    with pytest.raises(ValueError, match=r"p.jsonl:1: .*none was given. Fix: pass tokenizer="):
        load_jsonl(path, require_answer=False)


def test_chat_task_needs_reward_none() -> None:
    with pytest.raises(ConfigError, match="task.reward='exact_match': task.name=chat .* Fix: set task.reward=none"):
        TaskConfig(name="chat")


def test_packaged_chat_prompts_are_the_generated_ones() -> None:
    train, eval_ = generate()
    assert (len(train), len(eval_)) == (NUM_TRAIN, NUM_EVAL)
    assert len(set(train)) == NUM_TRAIN and not set(train) & set(eval_)
    read = [[json.loads(line)["messages"][0]["content"] for line in p.read_text().splitlines()]
            for p in (CHAT_TRAIN_PATH, CHAT_EVAL_PATH)]
    assert read == [train, eval_], "the packaged files are stale: run python -m asyncopd.tasks.chat_prompts"
    assert CHAT_TRAIN_PATH.stat().st_size < 100_000


def test_chat_task_serves_the_packaged_prompts(chat_tokenizer) -> None:
    task = load_task(TaskConfig(name="chat", reward="none", num_eval_prompts=10), tokenizer=chat_tokenizer)
    held_out = task.eval_prompts()
    assert len(held_out) == 10
    assert held_out[0].text == f"[user]{generate()[1][0]}\n[assistant]"
    first = next(iter(task.train_prompts(0, 1)))
    assert first.text.startswith("[user]") and first.text.endswith("\n[assistant]")
