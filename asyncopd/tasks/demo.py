"""The demo teacher and student of the synthetic addition task, trained once and cached.

:func:`ensure_demo_models` returns two Hugging Face directories (teacher, student)
that load with ``AutoModelForCausalLM.from_pretrained`` and in vLLM. On first use
it trains them by plain supervised next-token training (loss on the answer and
``<eos>`` tokens only) on the task's training distribution, held-out problems
excluded:

- the **teacher** is trained to near-perfect held-out accuracy;
- the **student** is the same run frozen early (about a tenth of the teacher's
  steps): it already answers in the right form (digits, then ``<eos>``, so the
  verifier can grade it) but is mostly wrong, which leaves on-policy distillation
  something to fix. Same architecture, so its ceiling is the teacher's, and the
  build costs one training run.

With ``task.student_accuracy`` set, the student is instead the same run frozen at that
(lower) dev accuracy, rebuilt by re-running the run's first steps and cached on its own;
the teacher stays the demo's.

The result lives under ``task.cache_dir`` in a directory keyed by the task
parameters and a digest of :data:`RECIPE` (change the recipe, get a new cache);
:func:`asyncopd.tasks.model_cache.build_once` makes concurrent callers (several
ranks) build it once and never leaves a half-written cache.

``python -m asyncopd.tasks.demo [--cache-dir D]`` builds the models if needed and
prints their held-out greedy accuracy.

This module does not sample with temperature, distil, or serve; it only trains
and grades the two starting points of the demo job.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase, Qwen2ForCausalLM

from asyncopd.config import TaskConfig
from asyncopd.tasks import Prompt, Task
from asyncopd.tasks.addition import AdditionTask, sample_operands
from asyncopd.tasks.model_cache import MANIFEST, build_once, keyed_dir
from asyncopd.tasks.tiny import save_tiny_model, tiny_config
from asyncopd.tasks.tokenizer import build_char_tokenizer

__all__ = [
    "DEMO_CODE_VERSION",
    "DemoRecipe",
    "RECIPE",
    "demo_cache_dir",
    "ensure_demo_models",
    "greedy_responses",
    "greedy_accuracy",
    "main",
]

logger = logging.getLogger(__name__)

DEMO_CODE_VERSION = "addition-demo-v1"
"""Bump when the training code changes in a way the recipes do not capture."""


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoRecipe:
    """Architecture and supervised schedule of the demo teacher, and how the student is taken."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 2
    """Attention heads; hidden_size / num_heads must be >= 32 (vLLM's CPU attention)."""
    num_kv_heads: int = 2
    intermediate_size: int = 128
    rope_theta: float = 100.0
    """RoPE base. Sequences here are ~13 tokens; a small base spends more of the rotary
    frequencies on positions that occur, and learns digit alignment faster than 10000."""
    lr: float = 3e-3
    """Peak AdamW learning rate."""
    batch_size: int = 256
    """Problems per step."""
    hard_fraction: float = 0.25
    """Share of each batch whose operands are drawn uniformly from [0, 10**max_digits)
    (mostly full-length) instead of from the task's distribution, which draws both
    operands full-length only 1 time in max_digits**2. Full-length sums with a carry
    out are where a short run's errors concentrate."""
    num_steps: int = 2000
    """Optimiser steps: linear warm-up, then cosine decay to zero. Small transformers learn
    carrying in a sudden transition whose step varies from seed to seed; too short a
    schedule decays the learning rate before it."""
    warmup_steps: int = 100
    check_every: int = 25
    """Steps between dev-accuracy checks (until the student snapshot is taken)."""
    num_dev_prompts: int = 200
    """Dev problems (training distribution, never the held-out prompts) for those checks."""
    seed: int = 1
    """Seed of the weight init and of the problem sampler. Runs differ a lot by seed (the
    transition above); seed 1 was picked on dev accuracy (1.00 vs 0.96 for seed 0)."""
    student_accuracy: float = 0.5
    """The student is the teacher's run frozen at the first check whose greedy accuracy on
    a dev set (training distribution, not the held-out prompts) reaches this, with every
    dev answer well formed (digits then <eos>). Measured with the demo job: a 15% snapshot
    (before the run learns carrying) has a per-token reverse KL of ~4.4 nats to the teacher,
    and sampled-token OPD barely moves it; from a ~50% snapshot (~1.3 nats) it makes steady
    progress."""


RECIPE = DemoRecipe()


def demo_cache_dir(cfg: TaskConfig) -> Path:
    """The directory that holds (or will hold) the demo models of ``cfg``."""
    key = {
        "version": DEMO_CODE_VERSION,
        "task": {"name": cfg.name, "max_digits": cfg.max_digits, "seed": cfg.seed,
                 "num_eval_prompts": cfg.num_eval_prompts},
        "recipe": dataclasses.asdict(RECIPE),
    }
    weak = ""
    if cfg.student_accuracy is not None:  # keyed only when set, so the demo's own cache keeps its name
        key["student_accuracy"] = cfg.student_accuracy
        weak = f"-student{cfg.student_accuracy:g}"
    return keyed_dir(cfg.cache_dir, f"{cfg.name}-d{cfg.max_digits}-seed{cfg.seed}{weak}", key)


def ensure_demo_models(cfg: TaskConfig, *, num_threads: int = 1) -> tuple[Path, Path]:
    """Return (teacher_dir, student_dir), training and caching them on first use.

    Safe to call from many processes at once: one builds, the others wait on the
    lock and then read the finished cache. ``num_threads`` is the torch intra-op
    thread count used while training (restored afterwards). One by default: these
    matmuls are too small to gain much from a second thread on an idle machine
    (~1.1x), and on a busy one OpenMP's spinning threads made 2 threads 5-10x slower.
    """
    if cfg.name != "addition":
        raise ValueError(f"task.name={cfg.name!r} has no demo models. Fix: use task.name=addition.")
    if cfg.student_accuracy is None:
        final = build_once(demo_cache_dir(cfg), lambda out: _build(cfg, out, num_threads=num_threads),
                           what="demo models")
        return final / "teacher", final / "student"
    # a weaker student beside the demo's own teacher
    teacher_dir, _ = ensure_demo_models(dataclasses.replace(cfg, student_accuracy=None), num_threads=num_threads)
    final = build_once(demo_cache_dir(cfg),
                       lambda out: _build_weak_student(cfg, out, teacher_dir, num_threads=num_threads),
                       what="weak demo student")
    return teacher_dir, final / "student"


def _build(cfg: TaskConfig, out: Path, *, num_threads: int) -> None:
    task = AdditionTask(cfg)
    tokenizer = build_char_tokenizer()
    max_new_tokens = cfg.max_digits + 2
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    start = time.perf_counter()
    try:
        teacher, student, student_step = _train(RECIPE, task, tokenizer, max_new_tokens=max_new_tokens)
        manifest: dict[str, object] = {
            "version": DEMO_CODE_VERSION,
            "task": dataclasses.asdict(cfg),
            "recipe": dataclasses.asdict(RECIPE),
            "student_step": student_step,
            "num_parameters": sum(p.numel() for p in teacher.parameters()),
        }
        for role, model in (("teacher", teacher), ("student", student)):
            accuracy = greedy_accuracy(model, tokenizer, task, task.eval_prompts(), max_new_tokens=max_new_tokens)
            logger.info("demo %s: held-out greedy accuracy %.3f", role, accuracy)
            manifest[f"{role}_eval_accuracy"] = accuracy
            save_tiny_model(out / role, model=model)
    finally:
        torch.set_num_threads(previous_threads)
    manifest["build_s"] = time.perf_counter() - start
    logger.info("built the demo models in %.0fs", manifest["build_s"])
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def _build_weak_student(cfg: TaskConfig, out: Path, teacher_dir: Path, *, num_threads: int) -> None:
    """The demo teacher's run again (same recipe and seed), stopped at the first check whose
    dev accuracy reaches ``cfg.student_accuracy``; only that snapshot is saved. The teacher
    stays the one in ``teacher_dir`` (the demo's cache), whose accuracy the manifest copies."""
    assert cfg.student_accuracy is not None
    task = AdditionTask(cfg)
    tokenizer = build_char_tokenizer()
    max_new_tokens = cfg.max_digits + 2
    recipe = dataclasses.replace(RECIPE, student_accuracy=cfg.student_accuracy)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    start = time.perf_counter()
    try:
        _, student, student_step = _train(recipe, task, tokenizer, max_new_tokens=max_new_tokens,
                                          stop_at_student=True)
        accuracy = greedy_accuracy(student, tokenizer, task, task.eval_prompts(), max_new_tokens=max_new_tokens)
        logger.info("weak demo student (step %d): held-out greedy accuracy %.3f", student_step, accuracy)
        save_tiny_model(out / "student", model=student)
    finally:
        torch.set_num_threads(previous_threads)
    teacher_manifest = json.loads((teacher_dir.parent / MANIFEST).read_text())
    manifest = {
        "version": DEMO_CODE_VERSION, "task": dataclasses.asdict(cfg), "recipe": dataclasses.asdict(recipe),
        "student_step": student_step, "student_eval_accuracy": accuracy, "teacher_dir": str(teacher_dir),
        "teacher_eval_accuracy": teacher_manifest["teacher_eval_accuracy"],
        "build_s": time.perf_counter() - start,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))


def _sample_problems(task: AdditionTask, rng: np.random.Generator, n: int, hard_fraction: float = 0.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` operand pairs, held-out problems removed: ``hard_fraction`` of them
    uniform over [0, 10**max_digits), the rest from the task's own distribution."""
    num_hard = int(round(n * hard_fraction))
    a, b = sample_operands(rng, n - num_hard, task.max_digits)
    if num_hard:
        a = np.concatenate([a, rng.integers(0, 10**task.max_digits, size=num_hard)])
        b = np.concatenate([b, rng.integers(0, 10**task.max_digits, size=num_hard)])
    keep = ~task.is_held_out(a, b)
    return a[keep], b[keep]


def _supervised_batch(tokenizer: PreTrainedTokenizerBase, a: np.ndarray, b: np.ndarray
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [batch, seq] (right-padded) and labels [batch, seq] (-100 except answer + eos)."""
    prompts = [f"{x}+{y}=" for x, y in zip(a.tolist(), b.tolist())]
    answers = [str(x + y) for x, y in zip(a.tolist(), b.tolist())]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    length = max(len(p) + len(s) for p, s in zip(prompt_ids, answer_ids)) + 1
    rows, targets = [], []
    for p, s in zip(prompt_ids, answer_ids):
        padding = length - len(p) - len(s) - 1
        rows.append(p + s + [eos] + [pad] * padding)
        # Position t predicts token t + 1: the answer starts after the prompt's last token.
        targets.append([-100] * (len(p) - 1) + s + [eos] + [-100] * (padding + 1))
    return torch.tensor(rows), torch.tensor(targets)


def _dev_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: AdditionTask,
                prompts: list[Prompt], max_new_tokens: int) -> tuple[float, float]:
    """(greedy accuracy, fraction of answers that are digits then <eos>) on ``prompts``."""
    responses = greedy_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    eos = tokenizer.eos_token
    well_formed = [r.endswith(eos) and r[: -len(eos)].isdigit() for r in responses]
    correct = [ok and task.reward(p, r) == 1.0 for p, r, ok in zip(prompts, responses, well_formed)]
    return sum(correct) / len(prompts), sum(well_formed) / len(prompts)


def _train(recipe: DemoRecipe, task: AdditionTask, tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int,
           stop_at_student: bool = False) -> tuple[Qwen2ForCausalLM, Qwen2ForCausalLM, int]:
    """Train the teacher; return (teacher, student snapshot, the snapshot's step). With
    ``stop_at_student`` the run stops at the snapshot (the "teacher" is then that model)."""
    torch.manual_seed(recipe.seed)
    config = tiny_config(
        hidden_size=recipe.hidden_size, num_layers=recipe.num_layers, num_heads=recipe.num_heads,
        num_kv_heads=recipe.num_kv_heads, intermediate_size=recipe.intermediate_size, max_positions=256,
    )
    config.rope_parameters["rope_theta"] = recipe.rope_theta
    model = Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)

    def lr_factor(step: int) -> float:  # step counts from 0
        warmup = min(1.0, (step + 1) / recipe.warmup_steps)
        return warmup * 0.5 * (1.0 + math.cos(math.pi * step / recipe.num_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = np.random.default_rng(recipe.seed)
    a, b = _sample_problems(task, rng, recipe.num_dev_prompts)
    dev = [Prompt(text=f"{x}+{y}=", answer=str(x + y), index=i) for i, (x, y) in enumerate(zip(a.tolist(), b.tolist()))]
    student: Qwen2ForCausalLM | None = None
    student_step = 0
    start = time.perf_counter()
    model.train()
    for step in range(1, recipe.num_steps + 1):
        input_ids, labels = _supervised_batch(
            tokenizer, *_sample_problems(task, rng, recipe.batch_size, recipe.hard_fraction)
        )
        logits = model(input_ids=input_ids).logits  # [batch, seq, vocab]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if student is None and step % recipe.check_every == 0:
            model.eval()
            accuracy, well_formed = _dev_scores(model, tokenizer, task, dev, max_new_tokens)
            model.train()
            if accuracy >= recipe.student_accuracy and well_formed == 1.0:
                student, student_step = copy.deepcopy(model).eval(), step
                logger.info("demo student = the teacher run at step %d (dev accuracy %.3f)", step, accuracy)
                if stop_at_student:
                    return model, student, student_step
        if step % 100 == 0:
            logger.info("demo teacher step %d/%d loss %.4f (%.0fs)", step, recipe.num_steps, loss.item(),
                        time.perf_counter() - start)
    model.eval()
    accuracy, _ = _dev_scores(model, tokenizer, task, dev, max_new_tokens)
    logger.info("demo teacher: dev accuracy %.3f after %d steps (%.0fs)", accuracy, recipe.num_steps,
                time.perf_counter() - start)
    if student is None:
        raise RuntimeError(
            f"the demo teacher run never reached dev accuracy {recipe.student_accuracy} with well-formed "
            f"answers, so there is no student snapshot ({recipe}). Fix: this is a recipe bug; raise "
            "DemoRecipe.num_steps or lower DemoRecipe.student_accuracy."
        )
    return model, student, student_step


@torch.no_grad()
def greedy_responses(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], *,
                     max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy completions of ``prompts`` as text. A completion that emitted ``<eos>``
    within ``max_new_tokens`` ends in ``"<eos>"``; one that ran out of tokens does not.
    """
    eos = tokenizer.eos_token_id
    responses: list[str] = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        enc = tokenizer([p.text for p in chunk], add_special_tokens=False, padding=True,
                        padding_side="left", return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        done = torch.zeros(len(chunk), dtype=torch.bool)
        generated: list[torch.Tensor] = []
        for _ in range(max_new_tokens):
            # No KV cache: responses are a few tokens and the models tiny. RoPE makes the
            # left padding's position offset irrelevant.
            next_ids = model(input_ids=ids, attention_mask=mask).logits[:, -1].argmax(-1)
            next_ids = torch.where(done, torch.full_like(next_ids, tokenizer.pad_token_id), next_ids)
            generated.append(next_ids)
            done |= next_ids == eos
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(next_ids)[:, None]], dim=1)
            if bool(done.all()):
                break
        for row in torch.stack(generated, dim=1).tolist():
            text_ids = row[: row.index(eos)] if eos in row else row
            suffix = tokenizer.eos_token if eos in row else ""
            responses.append(tokenizer.decode(text_ids, skip_special_tokens=True) + suffix)
    return responses


def greedy_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: Task,
                    prompts: list[Prompt], *, max_new_tokens: int) -> float:
    """Mean task reward of greedy completions that end in ``<eos>`` (others score 0)."""
    responses = greedy_responses(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    eos = tokenizer.eos_token
    scores = [task.reward(p, r) if r.endswith(eos) else 0.0 for p, r in zip(prompts, responses)]
    return float(sum(scores) / max(1, len(scores)))


def main(argv: list[str] | None = None) -> int:
    """CLI: build the demo models if needed and print their held-out greedy accuracy."""
    from transformers import AutoModelForCausalLM

    defaults = TaskConfig()
    parser = argparse.ArgumentParser(prog="python -m asyncopd.tasks.demo", description=main.__doc__)
    parser.add_argument("--cache-dir", default=None, help="task.cache_dir (default: $XDG_CACHE_HOME/asyncopd)")
    parser.add_argument("--max-digits", type=int, default=defaults.max_digits, help="task.max_digits")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="task.seed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads while building")
    parser.add_argument("--student-accuracy", type=float, default=None, help="task.student_accuracy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TaskConfig(cache_dir=args.cache_dir, max_digits=args.max_digits, seed=args.seed,
                     student_accuracy=args.student_accuracy)
    start = time.perf_counter()
    teacher_dir, student_dir = ensure_demo_models(cfg, num_threads=args.threads)
    print(f"demo models ready in {time.perf_counter() - start:.1f}s under {teacher_dir.parent}")
    task = AdditionTask(cfg)
    tokenizer = build_char_tokenizer()
    for role, path in (("teacher", teacher_dir), ("student", student_dir)):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        accuracy = greedy_accuracy(model, tokenizer, task, task.eval_prompts(), max_new_tokens=cfg.max_digits + 2)
        num_parameters = sum(p.numel() for p in model.parameters())
        print(f"{role}: held-out greedy accuracy {accuracy:.3f} on {len(task.eval_prompts())} prompts "
              f"({num_parameters} parameters) at {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
