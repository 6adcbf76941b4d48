"""Unit tests of asyncopd.tasks: prompt streams, verifier, JSONL loading, demo-cache plumbing.

No model is trained here; greedy decoding is exercised with a scripted fake model.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncopd.config import ConfigError, TaskConfig
from asyncopd.tasks import Prompt, Task, check_shard, load_task, normalize_response
from asyncopd.tasks.addition import AdditionTask
from asyncopd.tasks.demo import demo_cache_dir, ensure_demo_models, greedy_accuracy, greedy_responses
from asyncopd.tasks.jsonl import JsonlError, JsonlTask, load_jsonl
from asyncopd.tasks.tokenizer import build_char_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def take(task: Task, shard: int, num_shards: int, n: int, start: int = 0) -> list[Prompt]:
    return list(itertools.islice(task.train_prompts(shard, num_shards, start), n))


# --- verifier -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("579", 1.0),
        ("579<eos>", 1.0),
        ("579 \n", 1.0),
        ("579<eos><eos>", 1.0),
        ("578", 0.0),
        ("57", 0.0),
        ("0579", 0.0),
        (" 579", 0.0),
        ("579<eos>1", 0.0),
        ("", 0.0),
        ("<eos>", 0.0),
    ],
)
def test_reward_is_exact_match_tolerating_trailing_eos(response: str, expected: float) -> None:
    task = AdditionTask(TaskConfig())
    prompt = Prompt(text="123+456=", answer="579", index=0)
    assert task.reward(prompt, response) == expected


def test_normalize_response_strips_only_trailing_noise() -> None:
    assert normalize_response("42 <eos> \n") == "42"
    assert normalize_response("  42") == "  42"


# --- synthetic addition stream --------------------------------------------------------------


def test_addition_prompts_are_well_formed_sums() -> None:
    task = AdditionTask(TaskConfig(max_digits=3))
    prompts = take(task, 0, 1, 500) + task.eval_prompts()
    for p in prompts:
        match = re.fullmatch(r"(\d{1,3})\+(\d{1,3})=", p.text)
        assert match, p.text
        a, b = int(match[1]), int(match[2])
        assert p.answer == str(a + b)
        # No leading zeros: the operand is the canonical decimal form.
        assert match[1] == str(a) and match[2] == str(b)
    lengths = {len(re.match(r"\d+", p.text)[0]) for p in prompts}
    assert lengths == {1, 2, 3}


def test_train_stream_is_deterministic_and_seeded() -> None:
    first = take(AdditionTask(TaskConfig(seed=0)), 0, 1, 50)
    again = take(AdditionTask(TaskConfig(seed=0)), 0, 1, 50)
    other = take(AdditionTask(TaskConfig(seed=1)), 0, 1, 50)
    assert first == again
    assert [p.text for p in first] != [p.text for p in other]
    assert [p.index for p in first] == list(range(50))


def test_shards_are_disjoint_and_cover_the_global_stream() -> None:
    task = AdditionTask(TaskConfig())
    whole = take(task, 0, 1, 300)
    shards = [take(task, s, 3, 100) for s in range(3)]
    indices = [p.index for shard in shards for p in shard]
    assert sorted(indices) == list(range(300))
    for shard in shards:
        for p in shard:
            assert p == whole[p.index]


def test_start_resumes_a_shard_at_its_cursor() -> None:
    task = AdditionTask(TaskConfig())
    full = take(task, 1, 4, 10)
    resumed = take(task, 1, 4, 5, start=5)
    assert resumed == full[5:]
    assert resumed[0].index == 1 + 4 * 5


def test_eval_prompts_are_distinct_and_never_in_train_stream() -> None:
    # One-digit operands: only 100 distinct problems, so any leak would show quickly.
    cfg = TaskConfig(max_digits=1, num_eval_prompts=30)
    task = AdditionTask(cfg)
    held_out = {p.text for p in task.eval_prompts()}
    assert len(task.eval_prompts()) == 30 == len(held_out)
    assert [p.index for p in task.eval_prompts()] == list(range(30))
    seen = {p.text for p in take(task, 0, 1, 3000)}
    assert not seen & held_out
    assert len(seen) == 100 - 30  # and everything else is trained on


def test_is_held_out_marks_exactly_the_eval_problems() -> None:
    task = AdditionTask(TaskConfig())
    def operands(prompts: list[Prompt]) -> tuple[np.ndarray, np.ndarray]:
        pairs = [tuple(int(x) for x in p.text[:-1].split("+")) for p in prompts]
        return np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    assert task.is_held_out(*operands(task.eval_prompts())).all()
    assert not task.is_held_out(*operands(take(task, 0, 1, 500))).any()


def test_too_many_eval_prompts_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"task.num_eval_prompts=60.*Fix: lower"):
        AdditionTask(TaskConfig(max_digits=1, num_eval_prompts=60))


@pytest.mark.parametrize(("shard", "num_shards", "start"), [(2, 2, 0), (-1, 2, 0), (0, 0, 0), (0, 1, -1)])
def test_bad_shard_arguments_are_rejected(shard: int, num_shards: int, start: int) -> None:
    with pytest.raises(ValueError, match="Fix"):
        check_shard(shard, num_shards, start)
    with pytest.raises(ValueError, match="Fix"):
        next(AdditionTask(TaskConfig()).train_prompts(shard, num_shards, start))


def test_load_task_defaults_to_synthetic_addition() -> None:
    task = load_task(TaskConfig())
    assert isinstance(task, AdditionTask)
    assert isinstance(task, Task)


# --- tokenizer -----------------------------------------------------------------------------


def test_prompt_and_answer_round_trip_through_the_char_tokenizer(tokenizer) -> None:
    prompt = take(AdditionTask(TaskConfig()), 0, 1, 1)[0]
    ids = tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(prompt.text)  # one token per character
    assert tokenizer.decode(ids) == prompt.text
    response = tokenizer(prompt.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(response, skip_special_tokens=True) == prompt.answer
    assert AdditionTask(TaskConfig()).reward(prompt, tokenizer.decode(response)) == 1.0


# --- JSONL ---------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def record(prompt: str, answer: str) -> str:
    return json.dumps({"prompt": prompt, "answer": answer})


def test_jsonl_loads_records_and_skips_blank_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "p.jsonl", [record("1+1=", "2"), "", "   ",
                                               json.dumps({"prompt": "2+2=", "answer": "4", "id": 7})])
    prompts = load_jsonl(path)
    assert prompts == [Prompt("1+1=", "2", 0), Prompt("2+2=", "4", 1)]


@pytest.mark.parametrize(
    ("bad_line", "problem"),
    [
        ('{"prompt": "1+1=", "answer": "2"', "malformed JSON"),
        ('["1+1=", "2"]', "expected a JSON object"),
        ('{"answer": "2"}', 'missing field "prompt"'),
        ('{"prompt": "1+1="}', 'missing field "answer"'),
        ('{"prompt": "1+1=", "answer": 2}', 'field "answer" must be a string'),
        ('{"prompt": null, "answer": "2"}', 'field "prompt" must be a string'),
        ('{"prompt": "", "answer": "2"}', 'empty "prompt"'),
        ('{"prompt": "1+1=", "answer": ""}', 'empty "answer"'),
    ],
)
def test_jsonl_errors_name_file_line_problem_and_fix(tmp_path: Path, bad_line: str, problem: str) -> None:
    path = write_lines(tmp_path / "p.jsonl", [record("1+1=", "2"), "", bad_line, record("3+3=", "6")])
    with pytest.raises(JsonlError) as info:
        load_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")
    assert problem in message
    assert "Fix:" in message


def test_jsonl_rejects_prompts_longer_than_the_budget(tmp_path: Path, tokenizer) -> None:
    path = write_lines(tmp_path / "p.jsonl", [record("1+1=", "2"), record("12345+67890=", "80235")])
    assert len(load_jsonl(path, tokenizer=tokenizer, max_prompt_tokens=12)) == 2
    with pytest.raises(JsonlError, match=rf"^{re.escape(str(path))}:2: .*12 tokens, more than max_prompt_tokens=11"):
        load_jsonl(path, tokenizer=tokenizer, max_prompt_tokens=11)
    with pytest.raises(ValueError, match="without a tokenizer"):
        load_jsonl(path, max_prompt_tokens=11)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_jsonl_empty_file_is_an_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(JsonlError, match="holds no prompts"):
        load_jsonl(path)


def test_jsonl_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(record("1+1=", "2").encode() + b"\n" + b'{"prompt": "\xff", "answer": "1"}\n')
    with pytest.raises(JsonlError, match=rf"{re.escape(str(path))}:2: not valid UTF-8"):
        load_jsonl(path)


def test_jsonl_task_holds_out_eval_and_cycles_the_rest(tmp_path: Path) -> None:
    lines = [record(f"q{i}", str(i)) for i in range(20)]
    cfg = TaskConfig(train_path=str(write_lines(tmp_path / "t.jsonl", lines)), num_eval_prompts=5, seed=3)
    task = load_task(cfg)
    assert isinstance(task, JsonlTask)
    held_out = {p.text for p in task.eval_prompts()}
    assert len(held_out) == 5
    stream = take(task, 0, 1, 45)
    epochs = [stream[0:15], stream[15:30], stream[30:45]]
    for epoch in epochs:  # every training prompt exactly once per epoch, none held out
        assert sorted(p.text for p in epoch) == sorted({f"q{i}" for i in range(20)} - held_out)
    assert [p.text for p in epochs[0]] != [p.text for p in epochs[1]]  # reshuffled
    shards = [take(task, s, 2, 15) for s in range(2)]
    assert sorted(p.index for s in shards for p in s) == list(range(30))
    assert all(p == stream[p.index] for s in shards for p in s)
    assert task.reward(task.eval_prompts()[0], task.eval_prompts()[0].answer + "<eos>") == 1.0
    assert take(load_task(cfg), 0, 1, 45) == stream  # deterministic


def test_jsonl_task_with_eval_file_only_trains_on_synthetic(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "e.jsonl", [record(f"{i}+1=", str(i + 1)) for i in range(8)])
    task = load_task(TaskConfig(eval_path=str(path), num_eval_prompts=5))
    assert [p.text for p in task.eval_prompts()] == [f"{i}+1=" for i in range(5)]
    assert [p.index for p in task.eval_prompts()] == list(range(5))
    assert take(task, 0, 1, 3) == take(AdditionTask(TaskConfig()), 0, 1, 3)


def test_jsonl_train_file_too_small_to_hold_out(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "t.jsonl", [record("1+1=", "2")] * 3)
    with pytest.raises(JsonlError, match=r"Fix: set task.eval_path"):
        load_task(TaskConfig(train_path=str(path), num_eval_prompts=3))


# --- demo plumbing (no training) ------------------------------------------------------------


def test_demo_cache_dir_is_keyed_by_task_parameters(tmp_path: Path, monkeypatch) -> None:
    base = demo_cache_dir(TaskConfig(cache_dir=str(tmp_path)))
    assert base.parent == tmp_path
    assert demo_cache_dir(TaskConfig(cache_dir=str(tmp_path))) == base
    assert demo_cache_dir(TaskConfig(cache_dir=str(tmp_path), max_digits=2)) != base
    assert demo_cache_dir(TaskConfig(cache_dir=str(tmp_path), seed=5)) != base
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_cache_dir(TaskConfig()).parent == tmp_path / "xdg" / "asyncopd"


def test_ensure_demo_models_returns_a_finished_cache_without_building(tmp_path: Path) -> None:
    cfg = TaskConfig(cache_dir=str(tmp_path))
    final = demo_cache_dir(cfg)
    final.mkdir(parents=True)
    (final / "manifest.json").write_text("{}")
    assert ensure_demo_models(cfg) == (final / "teacher", final / "student")


def test_weak_student_has_its_own_cache_and_the_demo_teacher(tmp_path: Path) -> None:
    demo = TaskConfig(cache_dir=str(tmp_path))
    weak = TaskConfig(cache_dir=str(tmp_path), student_accuracy=0.05)
    # Keyed only when set: the demo's own cache keeps its name (no rebuild for anyone).
    assert demo_cache_dir(demo).name.startswith("addition-d3-seed0-") and "student" not in demo_cache_dir(demo).name
    assert demo_cache_dir(weak).name.startswith("addition-d3-seed0-student0.05-")
    assert demo_cache_dir(weak) != demo_cache_dir(TaskConfig(cache_dir=str(tmp_path), student_accuracy=0.1))
    for cfg in (demo, weak):  # two finished caches: nothing is built
        demo_cache_dir(cfg).mkdir(parents=True)
        (demo_cache_dir(cfg) / "manifest.json").write_text("{}")
    assert ensure_demo_models(weak) == (demo_cache_dir(demo) / "teacher", demo_cache_dir(weak) / "student")


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_student_accuracy_must_be_a_fraction(value: float) -> None:
    with pytest.raises(ConfigError, match=rf"task.student_accuracy.*{value}.*Fix"):
        TaskConfig(student_accuracy=value)


def test_student_accuracy_is_refused_for_the_chat_task() -> None:
    with pytest.raises(ConfigError, match=r"task.student_accuracy.*'chat'"):
        TaskConfig(name="chat", reward="none", student_accuracy=0.05)


def test_supervised_batch_puts_labels_on_answer_and_eos_only(tokenizer) -> None:
    from asyncopd.tasks.demo import _supervised_batch

    input_ids, labels = _supervised_batch(tokenizer, np.array([12, 5]), np.array([345, 7]))
    assert tokenizer.decode(input_ids[0]) == "12+345=357<eos>"
    assert tokenizer.decode(input_ids[1], skip_special_tokens=True) == "5+7=12"
    # Row 1: position 3 is "=", which must predict "1", then "2", then <eos>.
    expected = [-100] * 3 + tokenizer("12", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert labels[1].tolist() == expected + [-100] * (input_ids.shape[1] - len(expected))
    assert (labels[0] != -100).sum() == len("357") + 1


def test_interrupted_build_leftovers_are_removed(tmp_path: Path) -> None:
    from asyncopd.tasks.model_cache import remove_leftovers

    cfg = TaskConfig(cache_dir=str(tmp_path))
    final = demo_cache_dir(cfg)
    stale = final.parent / (final.name + ".tmp-abc123")
    (stale / "teacher").mkdir(parents=True)
    (final / "teacher").mkdir(parents=True)  # a final dir without manifest is not a finished build
    remove_leftovers(final)
    assert not stale.exists() and not final.exists()


class ScriptedModel(torch.nn.Module):
    """Greedy-decodes the same token script after any prompt (the k-th call emits script[k])."""

    def __init__(self, script: list[int], vocab_size: int) -> None:
        super().__init__()
        self.script, self.vocab_size, self.calls = script, vocab_size, 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        logits = torch.zeros(*input_ids.shape, self.vocab_size)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return type("Output", (), {"logits": logits})()


def test_greedy_accuracy_requires_eos_and_the_exact_answer(tokenizer) -> None:
    ids = tokenizer("57", add_special_tokens=False)["input_ids"]
    prompts = [Prompt("50+7=", "57", 0), Prompt("50+8=", "58", 1)]
    task = AdditionTask(TaskConfig())
    finished = ScriptedModel(ids + [tokenizer.eos_token_id], len(tokenizer))
    assert greedy_responses(finished, tokenizer, prompts, max_new_tokens=5) == ["57<eos>", "57<eos>"]
    assert greedy_accuracy(ScriptedModel(ids + [tokenizer.eos_token_id], len(tokenizer)), tokenizer, task,
                           prompts, max_new_tokens=5) == 0.5
    unfinished = ScriptedModel(ids, len(tokenizer))  # never emits eos: "577..." truncated
    assert greedy_responses(unfinished, tokenizer, prompts[:1], max_new_tokens=2) == ["57"]
    assert greedy_accuracy(ScriptedModel(ids, len(tokenizer)), tokenizer, task, prompts[:1], max_new_tokens=2) == 0.0


# ---- reward registry ------------------------------------------------------------------------

def test_reward_registry_matches_the_config_choices() -> None:
    import typing

    from asyncopd.tasks.rewards import REWARDS

    hints = typing.get_type_hints(TaskConfig)
    assert set(typing.get_args(hints["reward"])) == set(REWARDS)


@pytest.mark.parametrize(("response", "answer", "expected"), [
    ("357<eos>", "357", 1.0),
    ("357 ", "357", 1.0),
    ("0357", "357", 0.0),
    ("35", "357", 0.0),
])
def test_exact_match(response: str, answer: str, expected: float) -> None:
    from asyncopd.tasks.rewards import exact_match

    assert exact_match(response, answer) == expected


@pytest.mark.parametrize(("response", "answer", "expected"), [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("We get 12 apples, then 30 in total.", "30", 1.0),
    ("The result is $42$.", "42", 1.0),
    ("The result is $41$.", "42", 0.0),
    ("no number here at all", "7", 0.0),
    ("\\boxed{", "7", 0.0),
])
def test_math_answer(response: str, answer: str, expected: float) -> None:
    from asyncopd.tasks.rewards import math_answer

    assert math_answer(response, answer) == expected


def test_reward_none_is_nan_and_makes_jsonl_answers_optional(tmp_path) -> None:
    import math


    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"prompt": f"{i}+{i}="}) for i in range(12)))
    task = load_task(TaskConfig(train_path=str(train), num_eval_prompts=2, reward="none"))
    prompt = task.eval_prompts()[0]
    assert prompt.answer == ""
    assert math.isnan(task.reward(prompt, "anything"))
    with pytest.raises(JsonlError, match='missing field "answer".*task.reward=none'):
        load_task(TaskConfig(train_path=str(train), num_eval_prompts=2))


def test_task_uses_the_configured_reward() -> None:

    task = load_task(TaskConfig(reward="math_answer"))
    prompt = task.eval_prompts()[0]
    assert task.reward(prompt, f"it is \\boxed{{{prompt.answer}}}") == 1.0
    assert load_task(TaskConfig()).reward(prompt, f"it is \\boxed{{{prompt.answer}}}") == 0.0
