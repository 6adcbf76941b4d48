"""asyncopd vs TRL's DistillationTrainer: training time to a held-out reverse-KL target.

Both sides distill the same teacher into the same student on the same training
prompts in the same order (the task's stream ``train_prompts(0, 1)``), with the same
samples per step, learning rate (constant), AdamW betas, grad-norm clip and
``max_new_tokens``:

- ``trl``: TRL's ``DistillationTrainer`` with ``beta=1.0`` (the exact reverse KL over
  the full vocabulary on the student's own samples), one process, HF ``generate``,
  ``--trl-threads`` torch threads (2: the whole machine);
- ``topk``: the asyncopd job with ``loss.kl_loss=topk teacher.top_k=16 loss.pg_coef=0``
  (learner, actor and teacher in three processes);
- ``colocated``: ``--config-name colocated`` (the full-vocabulary KL, the teacher inside
  the learner: learner + actor, two processes).

On the real task (``--task real``) the only asyncopd side is ``smollm2``: the committed
``--config-name smollm2`` as it is (SmolLM2-135M-Instruct teacher inside the learner, the
26-layer student, the exact reverse KL over the full 49k vocabulary, the packaged chat
prompts already chat-templated, batch, lr, ``max_new_tokens`` and temperature from the
config), against TRL with ``beta=1`` on the same prompt strings (its tokenizer adds no
special tokens to them, so both sides see the same prompt ids). Extra ``key=value``
arguments go to the asyncopd runs (e.g. ``cluster.learner_threads=2``); the environment
(e.g. ``OMP_WAIT_POLICY=PASSIVE``) reaches both sides.

Each side keeps a snapshot of the student every ``--snapshot-every`` steps (TRL: a
state dict written from a callback; asyncopd: its DCP checkpoint) and its training
clock at that step, *excluding* the snapshot itself (TRL: the callback's time is
subtracted; asyncopd: the sum of the learner's ``timing/step_s``, which ends before
``maybe_checkpoint``). Start-up (model loading, vLLM engine, torchrun) is not in the
clock; the job's whole wall time is printed beside it.

Afterwards ONE function, :func:`evaluate`, scores every snapshot of every side: the
student samples each held-out prompt ``--eval-samples`` times at T=1 (HF sampling,
fixed seed), and the score is the exact per-token reverse KL to the teacher over the
whole vocabulary on those samples (``asyncopd.learner.full_kl.reverse_kl``), averaged
over response tokens (EOS included), i.e. the expectation that ``eval/rkl`` of an
asyncopd run estimates by Monte Carlo. Targets: half the start, the best value TRL
reaches, and ``common`` (the lowest value every side reaches); the time to each is
interpolated between snapshots. ``real_time_ratio`` falls back to ``common`` (and says so)
when a short real run does not halve the start on every side.

Time runs are meant for ``/work/bin/exclusive`` (an otherwise idle 2-core machine). A
shared machine's speed drifts over minutes, so ``--repeat N`` runs N windows, each side
once per window with the order rotating (``--out/<task>/w1`` ...), scores each window on
its own (a snapshot whose bytes another window already scored is not scored again) and
prints one row per window and the median ratios.
The last line is ``vs_trl demo_time_ratio <r> real_time_ratio <r>`` with
``r = asyncopd time / TRL time`` to half the start (the median over windows; ``nan`` where
not measured). The side in it is the configuration the README's "Which to use when" gives
for each task, the teacher inside the learner wherever it fits beside the student: demo
``colocated``, real ``smollm2``. On this 2-core machine three processes cannot each have
a core, which is where issue 8 asks to measure and choose: the three-role ``topk`` job's
ratio is printed in the table above the last line (session 10, 5 windows: median 1.07,
``colocated`` 0.95; ``bench/results/vs_trl.txt``).

Usage:
    python bench/vs_trl.py [--task demo|real|both] [--steps N] [--snapshot-every K] [--repeat N] [--out DIR]
    python bench/vs_trl.py --from-out DIR      (re-score / re-print finished runs)
    python bench/vs_trl.py --trl-worker SPEC   (internal: one TRL run in its own process)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class TaskSpec:
    """One comparison: a config plus the knobs both sides share."""

    name: str
    config_name: str
    steps: int
    batch: int
    lr: float
    snapshot_every: int
    eval_samples: int
    overrides: list[str] = field(default_factory=list)


SIDES = {  # asyncopd side -> (config name override or None, extra overrides)
    "topk": (None, ["loss.kl_loss=topk", "teacher.top_k=16", "loss.pg_coef=0"]),
    "colocated": ("colocated", []),
    "smollm2": (None, []),  # the real task's config as committed
}
TASK_SIDES = {"demo": ["topk", "colocated"], "real": ["smollm2"]}  # asyncopd sides per task
HEADLINE = {"demo": "colocated", "real": "smollm2"}  # the side in the last line's ratio (see the docstring)
EVAL_BATCH = {"demo": 64, "real": 16}  # bounds the [batch, tokens, vocab] logits of evaluate()


def _compose(spec: TaskSpec, config_name: str | None = None, extra: list[str] = ()):
    from asyncopd.launch import compose_config

    return compose_config(["--config-name", config_name or spec.config_name, *spec.overrides, *extra])


def _models_and_prompts(spec: TaskSpec):
    """(student dir, teacher dir, cfg, training prompt texts, held-out prompt texts)."""
    from transformers import AutoTokenizer

    from asyncopd.launch import resolve_model_paths
    from asyncopd.tasks import load_task

    cfg = _compose(spec)
    student, teacher = resolve_model_paths(cfg)
    task = load_task(cfg.task, tokenizer=AutoTokenizer.from_pretrained(student), replicate=cfg.run.seed)
    stream = task.train_prompts(0, 1)
    train = [next(stream).text for _ in range(spec.steps * spec.batch)]
    return student, teacher, cfg, train, [p.text for p in task.eval_prompts()]


# --------------------------------------------------------------------------- TRL side

def trl_worker(spec_path: Path) -> None:
    """One TRL run (own process: its own torch thread count and memory)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    job = json.loads(spec_path.read_text())
    spec, out, threads = TaskSpec(**job["spec"]), Path(job["out"]), job["threads"]
    torch.set_num_threads(threads)
    student, teacher, cfg, train, _ = _models_and_prompts(spec)
    tokenizer = AutoTokenizer.from_pretrained(student, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
    args = DistillationConfig(
        output_dir=str(out / "trainer"), beta=1.0, temperature=cfg.actor.temperature, top_p=1.0, top_k=0,
        max_completion_length=cfg.actor.max_new_tokens, per_device_train_batch_size=spec.batch,
        gradient_accumulation_steps=1, max_steps=spec.steps, learning_rate=spec.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=cfg.learner.weight_decay, adam_beta1=cfg.learner.adam_betas[0],
        adam_beta2=cfg.learner.adam_betas[1], max_grad_norm=cfg.learner.max_grad_norm, bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, shuffle_dataset=False, seed=cfg.run.seed, report_to=[],
        save_strategy="no", logging_steps=10, disable_tqdm=True, dataloader_num_workers=0)
    snapshots = out / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    clock: dict[int, float] = {}
    cpu: dict[int, float] = {}  # process CPU seconds (all threads), for CPU per sample

    class Snapshot(TrainerCallback):
        def __init__(self) -> None:
            self.start = 0.0
            self.excluded = 0.0
            self.excluded_cpu = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            now, now_cpu = time.perf_counter(), time.process_time()
            if state.global_step % spec.snapshot_every == 0 or state.global_step == spec.steps:
                clock[state.global_step] = now - self.start - self.excluded
                cpu[state.global_step] = now_cpu - self.cpu_start - self.excluded_cpu
                torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                           snapshots / f"step_{state.global_step}.pt")
                self.excluded += time.perf_counter() - now
                self.excluded_cpu += time.process_time() - now_cpu

    trainer = DistillationTrainer(model=model, teacher_model=teacher_model, args=args,
                                  train_dataset=Dataset.from_dict({"prompt": train}), processing_class=tokenizer,
                                  callbacks=[Snapshot()])
    trainer.train()
    (out / "clock.json").write_text(json.dumps({str(k): v for k, v in sorted(clock.items())}))
    (out / "cpu.json").write_text(json.dumps({str(k): v for k, v in sorted(cpu.items())}))


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants (torchrun's workers too)
    return usage.ru_utime + usage.ru_stime


def run_trl(spec: TaskSpec, out: Path, threads: int) -> tuple[float, float]:
    out.mkdir(parents=True, exist_ok=True)
    job = out / "job.json"
    job.write_text(json.dumps({"spec": asdict(spec), "out": str(out), "threads": threads}))
    start, cpu = time.perf_counter(), _children_cpu_s()
    with open(out / "log.txt", "w") as log:
        result = subprocess.run([sys.executable, __file__, "--trl-worker", str(job)], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT)
    if result.returncode:
        sys.exit(f"TRL run failed (exit {result.returncode}); see {out / 'log.txt'}")
    return time.perf_counter() - start, _children_cpu_s() - cpu


# ---------------------------------------------------------------------- asyncopd side

def run_asyncopd(spec: TaskSpec, side: str, out: Path, extra: list[str]) -> tuple[float, float]:
    config_name, overrides = SIDES[side]
    if out.exists():
        shutil.rmtree(out)  # resume=auto would continue an old run
    command = [sys.executable, "-m", "asyncopd.launch", "--config-name", config_name or spec.config_name,
               *spec.overrides, *overrides, f"learner.num_steps={spec.steps}", f"learner.batch_size={spec.batch}",
               f"learner.lr={spec.lr}", f"learner.checkpoint_every={spec.snapshot_every}",
               "learner.checkpoint_every_s=null", "eval.enabled=false", "learner.export_hf=false",
               "run.wandb=disabled", "run.progress=false", f"run.dir={out}", *extra]
    print("running:", " ".join(command[2:]), flush=True)
    start, cpu = time.perf_counter(), _children_cpu_s()
    with open(str(out) + ".log", "w") as log:
        result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode:
        print(f"asyncopd {side} run failed (exit {result.returncode}); see {out}.log", flush=True)
    return time.perf_counter() - start, _children_cpu_s() - cpu


def asyncopd_clock(run_dir: Path) -> dict[int, float]:
    """Training seconds at each policy version: the running sum of the learner's step times."""
    total, clock = 0.0, {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "timing/step_s" in record:
            total += record["timing/step_s"]
            clock[int(record["step"])] = total
    return clock


# ------------------------------------------------------------------------ evaluation

def evaluate(student, teacher, tokenizer, prompts: list[str], *, samples: int, max_new_tokens: int,
             seed: int = 1234, batch: int = 64) -> float:
    """Mean over the student's T=1 response tokens (EOS included) of the exact reverse
    KL(student || teacher) over the whole vocabulary at that position."""
    import torch

    from asyncopd.learner.full_kl import reverse_kl

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    total, count = 0.0, 0
    generator_seed = seed
    rows = [p for p in prompts for _ in range(samples)]
    with torch.no_grad():
        for first in range(0, len(rows), batch):
            chunk = rows[first:first + batch]
            enc = tokenizer(chunk, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
            torch.manual_seed(generator_seed)
            generator_seed += 1
            out = student.generate(**enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
            width = enc["input_ids"].shape[1]
            response = out[:, width:]  # [B, R]
            # response tokens up to and including the first EOS
            is_eos = (response == eos).int()
            after_eos = (is_eos.cumsum(1) - is_eos) > 0
            response_mask = ~after_eos  # [B, R]
            mask = torch.cat([enc["attention_mask"], response_mask.long()], dim=1)  # [B, P+R]
            s_logits = student(input_ids=out, attention_mask=mask).logits[:, width - 1:-1].float()  # [B, R, V]
            t_logits = teacher(input_ids=out, attention_mask=mask).logits[:, width - 1:-1].float()
            vocab = min(s_logits.shape[-1], t_logits.shape[-1])
            sel = response_mask.reshape(-1)
            s = s_logits[..., :vocab].reshape(-1, vocab)[sel]
            t = torch.log_softmax(t_logits[..., :vocab].reshape(-1, vocab)[sel], dim=-1)
            kl = reverse_kl(s, t)
            total += float(kl.sum())
            count += int(sel.sum())
    return total / max(count, 1)


def load_snapshot(student_dir: str, path: Path):
    """A student with the weights of a TRL state dict (``.pt``) or an asyncopd DCP checkpoint (directory)."""
    import torch

    from asyncopd.learner.checkpoint import load_checkpoint
    from asyncopd.learner.model import load_student

    model = load_student(student_dir)
    if path.suffix == ".pt":
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        load_checkpoint(path, model, torch.optim.AdamW(model.parameters()))
    model.config.use_cache = True
    return model.eval()


def snapshot_digest(path: Path) -> str:
    """sha256 of a snapshot's bytes (a ``.pt`` file, or every file of a DCP directory):
    identical weights in two windows of ``--repeat`` are scored once."""
    digest = hashlib.sha256()
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() if file != path else b"")
        digest.update(file.read_bytes())
    return digest.hexdigest()


def score_side(spec: TaskSpec, side_dir: Path, is_trl: bool, student_dir: str, teacher, tokenizer,
               eval_prompts: list[str], max_new_tokens: int, start_rkl: float,
               shared: dict[str, float] | None = None) -> list[tuple[int, float, float]]:
    """[(step, training seconds, reverse KL)] from step 0 (the shared start). ``shared``:
    scores by :func:`snapshot_digest`, filled and reused across windows."""
    if is_trl:
        clock = {int(k): v for k, v in json.loads((side_dir / "clock.json").read_text()).items()}
        paths = {step: side_dir / "snapshots" / f"step_{step}.pt" for step in clock}
    else:
        clock = asyncopd_clock(side_dir)
        paths = {int(p.name.split("_")[1]): p for p in (side_dir / "checkpoints").glob("step_*")}
    cache = side_dir / "scores.json"
    scores = json.loads(cache.read_text()) if cache.is_file() else {}
    curve = [(0, 0.0, start_rkl)]
    for step in sorted(paths):
        if step not in clock:
            continue
        if str(step) not in scores:
            digest = snapshot_digest(paths[step]) if shared is not None else None
            if digest in (shared or {}):
                scores[str(step)] = shared[digest]
            else:
                model = load_snapshot(student_dir, paths[step])
                scores[str(step)] = evaluate(model, teacher, tokenizer, eval_prompts, samples=spec.eval_samples,
                                             max_new_tokens=max_new_tokens, batch=EVAL_BATCH[spec.name])
                if digest is not None:
                    shared[digest] = scores[str(step)]
            cache.write_text(json.dumps(scores))
        curve.append((step, clock[step], scores[str(step)]))
    return curve


def chat_quality(out: Path, student_dir: str, teacher, tokenizer, prompts: list[str],
                 curves: dict[str, list], max_new_tokens: int) -> dict[str, dict]:
    """bench/chat_quality.py's measures for the start and each side's last snapshot: the
    student's NLL of the teacher's own T=1 answers (seeded), distinct-2, 4-gram repetition,
    EOS rate, and one sample to read. Cached in ``out/quality.json``."""
    from bench.chat_quality import diversity, nll, sample

    cache = out / "quality.json"
    results = json.loads(cache.read_text()) if cache.is_file() else {}
    references = sample(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=0)
    eos = tokenizer.eos_token_id
    models = {"teacher": None, "start": None}
    for side, curve in curves.items():
        step = curve[-1][0]
        path = (out / side / "snapshots" / f"step_{step}.pt" if side == "trl"
                else out / side / "checkpoints" / f"step_{step}")
        models[f"{side}@{step}"] = path
    for name, path in models.items():
        if name in results:
            continue
        if name == "teacher":
            model, own = teacher, references
        else:
            import torch
            from transformers import AutoModelForCausalLM

            model = (AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval() if path is None
                     else load_snapshot(student_dir, path))
            own = sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=1)
        d2, rep4 = diversity(own, eos)
        results[name] = {"nll_teacher": nll(model, tokenizer, prompts, references), "distinct2": d2, "rep4": rep4,
                         "eos_rate": sum(bool(x) and x[-1] == eos for x in own) / len(own),
                         "sample": tokenizer.decode(own[0], skip_special_tokens=True)[:240]}
        cache.write_text(json.dumps(results, indent=1))
    print(f"   quality on {len(prompts)} held-out prompts (bench/chat_quality.py measures, T=1, seeded):")
    for name, r in results.items():
        print(f"   {name:<14} NLL of teacher answers {r['nll_teacher']:.3f}  distinct-2 {r['distinct2']:.3f}  "
              f"rep-4 {r['rep4']:.3f}  EOS {r['eos_rate']:.2f}  | {json.dumps(r['sample'][:120])}")
    return results


def time_to(curve: list[tuple[int, float, float]], target: float) -> tuple[float, float] | None:
    """(step, seconds) at which the reverse KL first reaches ``target``, interpolated; None if never."""
    for (s0, t0, r0), (s1, t1, r1) in zip(curve, curve[1:]):
        if r1 <= target:
            f = (r0 - target) / (r0 - r1) if r0 > target else 0.0
            return s0 + f * (s1 - s0), t0 + f * (t1 - t0)
    return None


def report(spec: TaskSpec, out: Path, walls: dict[str, float],
           shared: dict[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Score every side, print the table, return {side: {"ratio": its time / TRL's to half the
    start (real task: to ``common`` when a short run does not halve it on every side),
    "s_per_step": training seconds per step}}."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    student_dir, teacher_dir, cfg, _, eval_prompts = _models_and_prompts(spec)

    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    max_new = cfg.actor.max_new_tokens
    start_cache = out / "start_rkl.json"
    if start_cache.is_file():
        start = json.loads(start_cache.read_text())["rkl"]
    else:
        start = evaluate(AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval(), teacher,
                         tokenizer, eval_prompts, samples=spec.eval_samples, max_new_tokens=max_new,
                         batch=EVAL_BATCH[spec.name])
        start_cache.write_text(json.dumps({"rkl": start}))
    curves = {}
    for side in ["trl", *TASK_SIDES[spec.name]]:
        side_dir = out / side
        if (side_dir / ("clock.json" if side == "trl" else "metrics.jsonl")).is_file():
            curves[side] = score_side(spec, side_dir, side == "trl", student_dir, teacher, tokenizer,
                                      eval_prompts, max_new, start, shared)
    if "trl" not in curves:
        return {}
    best_trl = min(r for _, _, r in curves["trl"])
    targets = {"half": start / 2, "trl_best": best_trl}
    # The lowest reverse KL that every side reaches: a target a short run always has.
    targets["common"] = max(min(r for _, _, r in curve) for curve in curves.values())
    print(f"\n== {spec.name}: {spec.config_name} {' '.join(spec.overrides)}; {spec.steps} steps x {spec.batch} "
          f"samples, lr {spec.lr}; held-out reverse KL at start {start:.4f} "
          f"({len(eval_prompts)} prompts x {spec.eval_samples} samples, one evaluate() for all)")
    for side, curve in curves.items():
        per_step = curve[-1][1] / max(curve[-1][0], 1)
        wall, cpu = walls.get(side, (math.nan, math.nan))
        print(f"   {side:<10} s/step {per_step:.3f}  job wall {wall:.0f}s, job CPU {cpu:.0f}s  "
              f"curve " + ", ".join(f"{s}:{r:.3f}@{t:.1f}s" for s, t, r in curve[1:]))
        cpu_file = out / side / "cpu.json"
        if cpu_file.is_file():
            cpu_clock = {int(k): v for k, v in json.loads(cpu_file.read_text()).items()}
            last = max(cpu_clock)
            print(f"   {'':<10} process CPU {cpu_clock[last] / last:.3f} core-s/step over {last} steps")
    ratios = {}
    for label, target in targets.items():
        line = f"   target {label} (rKL {target:.4f}):"
        trl_hit = time_to(curves["trl"], target)
        for side, curve in curves.items():
            hit = time_to(curve, target)
            line += f"  {side} " + (f"{hit[1]:.1f}s (step {hit[0]:.0f})" if hit else f">{curve[-1][1]:.0f}s")
            if side != "trl":
                ratio = hit[1] / trl_hit[1] if hit and trl_hit else math.nan
                ratios[(label, side)] = ratio
                line += f" [x{ratio:.2f} TRL]"
        print(line)
    summary = {"start": start, "targets": targets, "curves": curves, "walls": walls,
               "ratios": {f"{k[0]}/{k[1]}": v for k, v in ratios.items()}}
    if spec.name == "real":  # a faster side must not be a worse student
        summary["quality"] = chat_quality(out, student_dir, teacher, tokenizer, eval_prompts, curves, max_new)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    target = "half"
    if spec.name == "real" and any(math.isnan(ratios[("half", side)]) for side in curves if side != "trl"):
        target = "common"  # a few real steps may not halve it: say which target
        print("   real_time_ratio below: target common (half the start not reached by every side)")
    return {side: {"ratio": 1.0 if side == "trl" else ratios[(target, side)],
                   "s_per_step": curve[-1][1] / max(curve[-1][0], 1)} for side, curve in curves.items()}


# ----------------------------------------------------------------------------- main

def task_specs(args: argparse.Namespace) -> list[TaskSpec]:
    specs = []
    if args.task in ("demo", "both"):
        specs.append(TaskSpec(name="demo", config_name="default", steps=args.steps, batch=args.batch, lr=args.lr,
                              snapshot_every=args.snapshot_every, eval_samples=args.eval_samples))
    if args.task in ("real", "both"):
        from asyncopd.launch import compose_config

        committed = compose_config(["--config-name", "smollm2"])  # batch and lr as committed unless given
        specs.append(TaskSpec(name="real", config_name="smollm2", steps=args.real_steps,
                              batch=args.real_batch or committed.learner.batch_size,
                              lr=args.real_lr or committed.learner.lr, snapshot_every=args.real_snapshot_every,
                              eval_samples=args.real_eval_samples))
    return specs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=["demo", "real", "both"], default="demo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1.5e-4)
    parser.add_argument("--snapshot-every", type=int, default=10)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--real-steps", type=int, default=6)
    parser.add_argument("--real-batch", type=int, default=None, help="default: configs/smollm2.yaml's")
    parser.add_argument("--real-lr", type=float, default=None, help="default: configs/smollm2.yaml's")
    parser.add_argument("--real-snapshot-every", type=int, default=2)
    parser.add_argument("--real-eval-samples", type=int, default=4)
    parser.add_argument("--trl-threads", type=int, default=2)
    parser.add_argument("--sides", default=None,
                        help="which runs to (re)do (default: trl and the task's asyncopd sides)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/vs_trl"))
    parser.add_argument("--from-out", action="store_true", help="only score and print the runs in --out")
    parser.add_argument("--no-score", action="store_true", help="only run (score later with --from-out)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="windows: every side runs once per window (the order rotating), into --out/<task>/wN; "
                             "the last line gives the median ratio over windows")
    parser.add_argument("--trl-worker", type=Path, help=argparse.SUPPRESS)
    args, extra = parser.parse_known_args()
    if args.trl_worker:
        trl_worker(args.trl_worker)
        return 0
    ratios = {"demo": math.nan, "real": math.nan}
    for spec in task_specs(args):
        out = args.out / spec.name
        out.mkdir(parents=True, exist_ok=True)
        if args.from_out:
            windows = sorted(out.glob("w[0-9]*"), key=lambda p: int(p.name[1:])) or [out]
        else:
            windows = [out] if args.repeat == 1 else [out / f"w{i + 1}" for i in range(args.repeat)]
            sides = args.sides.split(",") if args.sides else ["trl", *TASK_SIDES[spec.name]]
            sides = [s for s in sides if s == "trl" or s in TASK_SIDES[spec.name]]
            for i, window in enumerate(windows):
                window.mkdir(parents=True, exist_ok=True)
                order = sides[i % len(sides):] + sides[:i % len(sides)]  # drift must not favour one side
                if len(windows) > 1:
                    print(f"== window {i + 1}/{len(windows)}: {', '.join(order)}", flush=True)
                run_window(spec, window, order, args.trl_threads, extra)
        if args.no_score:
            continue
        cache = out / "score_cache.json"
        shared = json.loads(cache.read_text()) if cache.is_file() else {}
        results = []
        for window in windows:
            walls_file = window / "walls.json"
            walls = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
            results.append(report(spec, window, walls, shared))
            cache.write_text(json.dumps(shared))
        ratios[spec.name] = median_over_windows(spec, windows, results)
    print(f"vs_trl demo_time_ratio {ratios['demo']:.2f} real_time_ratio {ratios['real']:.2f}")
    return 0


def run_window(spec: TaskSpec, out: Path, sides: list[str], trl_threads: int, extra: list[str]) -> None:
    """Every side once, in ``sides``' order, into ``out``."""
    walls_file = out / "walls.json"
    walls = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    for side in sides:
        if side == "trl":
            if (out / "trl").exists():
                shutil.rmtree(out / "trl")
            walls["trl"] = run_trl(spec, out / "trl", trl_threads)
        else:
            walls[side] = run_asyncopd(spec, side, out / side, extra)
        walls_file.write_text(json.dumps(walls))
        print(f"   {side}: job wall {walls[side][0]:.0f}s, CPU {walls[side][1]:.0f}s", flush=True)


def median_over_windows(spec: TaskSpec, windows: list[Path], results: list[dict[str, dict[str, float]]]) -> float:
    """Print one row per window and the medians; return the headline side's median ratio."""
    sides = [s for s in ["trl", *TASK_SIDES[spec.name]] if any(s in r for r in results)]
    ours = [s for s in sides if s != "trl"]
    medians = {s: statistics.median(r[s]["ratio"] for r in results if s in r) for s in ours}
    if len(windows) > 1:
        def row(name: str, steps: list[str], ratios: list[str]) -> None:
            print(f"   {name:<7} " + "  ".join(f"{cell:>16}" for cell in steps + ratios))

        def value(result: dict, side: str, key: str, digits: int) -> str:
            return f"{result[side][key]:.{digits}f}" if side in result else "nan"

        print(f"\n== {spec.name}: {len(windows)} windows (each side once per window, the order rotating)")
        row("window", [f"{s} s/step" for s in sides], [f"ratio {s}" for s in ours])
        for window, result in zip(windows, results):
            row(window.name, [value(result, s, "s_per_step", 3) for s in sides],
                [value(result, s, "ratio", 2) for s in ours])
        row("median", [""] * len(sides), [f"{medians[s]:.2f}" for s in ours])
    return medians.get(HEADLINE[spec.name], math.nan)


if __name__ == "__main__":
    sys.exit(main())
