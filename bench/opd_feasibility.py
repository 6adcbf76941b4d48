"""Feasibility of on-policy distillation on the demo models, with plain transformers.

No vLLM, no distributed, no asyncopd roles: one process samples a batch from the
student at temperature 1, scores the sampled tokens with teacher and student,
and takes a policy-gradient step with the per-token advantage
``A_t = lp_teacher - lp_student.detach()`` (token-mean loss, AdamW, clip 1.0).
Before and after, it measures on the held-out prompts the student's mean
per-token reverse KL on its own samples (``mean(lp_student - lp_teacher)``) and
its greedy accuracy. The point is to pick the job's learner.lr / batch_size /
num_steps, so it prints a table, not a pass/fail.

    python bench/opd_feasibility.py --lr 3e-4 1e-3 3e-3 --batch-size 32 64 --steps 60
"""

from __future__ import annotations

import argparse
import itertools
import logging
import time

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from asyncopd.config import TaskConfig
from asyncopd.tasks import Prompt, load_task
from asyncopd.tasks.demo import ensure_demo_models, greedy_accuracy
from asyncopd.tasks.tokenizer import build_char_tokenizer


def sample(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], *,
           max_new_tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample at T=1. Returns (prompt_ids [B, P] left-padded, prompt_mask [B, P],
    response_ids [B, T] padded after eos) and response_mask [B, T] (1 up to and including eos)."""
    enc = tokenizer([p.text for p in prompts], add_special_tokens=False, padding=True,
                    padding_side="left", return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    done = torch.zeros(len(prompts), dtype=torch.bool)
    out, out_mask = [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=mask).logits[:, -1].float()
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)[:, 0]
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            out.append(nxt)
            out_mask.append((~done).long())
            done = done | (nxt == eos)
            ids = torch.cat([ids, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)[:, None]], 1)
            if bool(done.all()):
                break
    return enc["input_ids"], enc["attention_mask"], torch.stack(out, 1), torch.stack(out_mask, 1)


def token_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                   response_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """log p(response_t | prompt, response_<t) for every response position: [B, T]."""
    ids = torch.cat([prompt_ids, response_ids], 1)
    mask = torch.cat([prompt_mask, response_mask], 1)
    num_prompt = prompt_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask).logits[:, num_prompt - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(-1, response_ids[..., None])[..., 0]


def held_out_rkl(student: torch.nn.Module, teacher: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                 prompts: list[Prompt], *, max_new_tokens: int, seed: int) -> float:
    """Mean over sampled response tokens of lp_student - lp_teacher (student samples, T=1)."""
    generator = torch.Generator().manual_seed(seed)
    p_ids, p_mask, r_ids, r_mask = sample(student, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                          generator=generator)
    with torch.no_grad():
        lp_s = token_logprobs(student, p_ids, p_mask, r_ids, r_mask)
        lp_t = token_logprobs(teacher, p_ids, p_mask, r_ids, r_mask)
    return float(((lp_s - lp_t) * r_mask).sum() / r_mask.sum())


def run_setting(lr: float, batch_size: int, num_steps: int, args: argparse.Namespace) -> dict[str, float]:
    cfg = TaskConfig(cache_dir=args.cache_dir, num_eval_prompts=args.eval_prompts)
    task = load_task(cfg)
    teacher_dir, student_dir = ensure_demo_models(cfg)
    tokenizer = build_char_tokenizer()
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(args.student or student_dir)
    for p in teacher.parameters():
        p.requires_grad_(False)
    if args.teacher_temperature != 1.0:
        # The final RMSNorm's weight multiplies the hidden state that the (tied) LM head
        # reads, so scaling it by 1/T divides every logit by T.
        teacher.model.norm.weight.div_(args.teacher_temperature)
    eval_prompts = task.eval_prompts()
    max_new = args.max_new_tokens

    def measure() -> tuple[float, float]:
        student.eval()
        rkl = held_out_rkl(student, teacher, tokenizer, eval_prompts * args.rkl_samples, max_new_tokens=max_new,
                           seed=1234)
        acc = greedy_accuracy(student, tokenizer, task, eval_prompts, max_new_tokens=max_new)
        student.train()
        return rkl, acc

    rkl0, acc0 = measure()
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    prompts = task.train_prompts(0, 1)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    curve = []
    for step in range(num_steps):
        batch = list(itertools.islice(prompts, batch_size))
        p_ids, p_mask, r_ids, r_mask = sample(student, tokenizer, batch, max_new_tokens=max_new,
                                              generator=generator)
        with torch.no_grad():
            lp_t = token_logprobs(teacher, p_ids, p_mask, r_ids, r_mask)
        lp_s = token_logprobs(student, p_ids, p_mask, r_ids, r_mask)  # [B, T], with grad
        advantage = (lp_t - lp_s.detach()) * r_mask
        loss = -(advantage * lp_s).sum() / r_mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        if args.curve_every and (step + 1) % args.curve_every == 0:
            curve.append((step + 1, *measure()))
    step_s = (time.perf_counter() - start) / num_steps
    rkl1, acc1 = measure()
    for point in curve:
        print(f"    step {point[0]:3d}: rkl {point[1]:.4f} acc {point[2]:.3f}", flush=True)
    return {"rkl_before": rkl0, "rkl_after": rkl1, "acc_before": acc0, "acc_after": acc1, "step_s": step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rkl-samples", type=int, default=4, help="samples per held-out prompt for the RKL")
    parser.add_argument("--student", default=None, help="student HF directory (default: the demo student)")
    parser.add_argument("--teacher-temperature", type=float, default=1.0,
                        help="divide the teacher's logits by this (the cached teacher is left as is)")
    parser.add_argument("--curve-every", type=int, default=0, help="also measure every N steps (slower)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(f"{'lr':>8} {'B':>4} {'steps':>5} {'rkl before':>10} {'rkl after':>9} {'ratio':>6} "
          f"{'acc before':>10} {'acc after':>9} {'s/step':>7}", flush=True)
    for lr, batch_size in itertools.product(args.lr, args.batch_size):
        r = run_setting(lr, batch_size, args.steps, args)
        print(f"{lr:8.1e} {batch_size:4d} {args.steps:5d} {r['rkl_before']:10.4f} {r['rkl_after']:9.4f} "
              f"{r['rkl_after'] / r['rkl_before']:6.2f} {r['acc_before']:10.3f} {r['acc_after']:9.3f} "
              f"{r['step_s']:7.3f}", flush=True)


if __name__ == "__main__":
    main()
