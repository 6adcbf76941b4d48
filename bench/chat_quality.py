"""What a chat student is worth, measured with plain transformers against its teacher.

For the held-out chat prompts (the chat task's packaged eval set, rendered with the
chat template), the teacher samples one answer per prompt at temperature 1 with a
fixed seed (its *references*). Then, for the teacher and every model given:

- ``nll_teacher``: mean per-token NLL of the teacher's references under the model
  (teacher-forced; EOS included). A collapsed student cannot lower it.
- ``distinct2``: distinct bigrams / bigrams over all its own T=1 samples (seeded);
  ``rep4``: share of 4-grams that repeat an earlier 4-gram of the same sample.
- ``mean_len`` (tokens) and ``eos_rate`` of those samples.
- two prompt/sample pairs to read.

It is the yardstick of the README's real-model numbers until the job's own
evaluation reports these measures; it prints a table and writes JSON.

    python bench/chat_quality.py --models runs/smollm2/hf --out bench/results/smollm2_quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asyncopd.config import TaskConfig
from asyncopd.tasks.jsonl import CHAT_EVAL_PATH, load_jsonl
from asyncopd.tasks.smollm2 import ensure_smollm2_models


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int, batch: int = 8
           ) -> list[list[int]]:
    """T=1 samples (token ids, EOS kept when sampled) of every prompt, seeded per batch."""
    out: list[list[int]] = []
    eos = tokenizer.eos_token_id
    for first in range(0, len(prompts), batch):
        enc = tokenizer(prompts[first:first + batch], add_special_tokens=False, padding=True,
                        padding_side="left", return_tensors="pt")
        torch.manual_seed(seed + first)
        gen = model.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


@torch.no_grad()
def nll(model, tokenizer, prompts: list[str], responses: list[list[int]]) -> float:
    """Mean per-token NLL of ``responses`` after ``prompts`` (all tokens pooled)."""
    total, count = 0.0, 0
    for prompt, response in zip(prompts, responses):
        if not response:
            continue
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        x = torch.tensor([ids + response])
        logp = torch.log_softmax(model(input_ids=x).logits[0, len(ids) - 1:-1].float(), -1)
        total -= logp.gather(1, torch.tensor(response)[:, None]).sum().item()
        count += len(response)
    return total / max(1, count)


def diversity(samples: list[list[int]], eos: int) -> tuple[float, float]:
    bigrams, repeated, fourgrams = [], 0, 0
    for s in samples:
        s = [t for t in s if t != eos]
        bigrams += list(zip(s, s[1:]))
        seen = set()
        for g in zip(s, s[1:], s[2:], s[3:]):
            fourgrams += 1
            repeated += g in seen
            seen.add(g)
    return len(set(bigrams)) / max(1, len(bigrams)), repeated / max(1, fourgrams)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=[], help="student directories to measure (after)")
    parser.add_argument("--num-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    teacher_dir, student_dir = ensure_smollm2_models(TaskConfig(name="chat", reward="none"))
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    prompts = [p.text for p in load_jsonl(CHAT_EVAL_PATH, tokenizer=tokenizer, require_answer=False)]
    prompts = prompts[: args.num_prompts]
    eos = tokenizer.eos_token_id
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    start = time.perf_counter()
    references = sample(teacher, tokenizer, prompts, max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f"teacher references in {time.perf_counter() - start:.0f}s")
    results = {}
    for name, path in [("teacher", str(teacher_dir)), ("student_start", str(student_dir))] + [
            (m, m) for m in args.models]:
        model = teacher if name == "teacher" else AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        own = references if name == "teacher" else sample(model, tokenizer, prompts,
                                                          max_new_tokens=args.max_new_tokens, seed=args.seed + 1)
        d2, rep4 = diversity(own, eos)
        results[name] = {
            "path": path,
            "nll_teacher": nll(model, tokenizer, prompts, references),
            "distinct2": d2, "rep4": rep4,
            "mean_len": sum(map(len, own)) / len(own),
            "eos_rate": sum(bool(s) and s[-1] == eos for s in own) / len(own),
            "samples": [{"prompt": prompts[i], "completion": tokenizer.decode(own[i], skip_special_tokens=True)}
                        for i in range(2)],
        }
        r = results[name]
        print(f"{name:14s} nll_teacher {r['nll_teacher']:.3f} distinct2 {d2:.3f} rep4 {rep4:.3f} "
              f"len {r['mean_len']:.1f} eos {r['eos_rate']:.2f}")
        for s in r["samples"]:
            print("   >>", json.dumps(s["completion"][:300]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
