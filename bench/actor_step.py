"""CPU seconds of the actor's own work per training step, the engine driven by hand (issue 8).

Builds the actor's :class:`~asyncopd.actor.engine.VllmEngine` on the job's student (the
demo's, or SmolLM2's with ``--config-name smollm2``) exactly as a job configures it
(``--config-name`` plus overrides), then repeats what the actor does for one step
(``learner.batch_size`` samples): admit the batch (seeded requests, as
:class:`~asyncopd.actor.worker.ActorLoop` seeds them), step the engine until every
request finished, turn each completion into the :class:`~asyncopd.types.Rollout` the
actor ships (decode, reward, msgpack encode) and load new weights (a slightly changed
copy of the student each step, through :meth:`VllmEngine.load_weights`, i.e. the
loader a job's actor uses (asyncopd.actor.weight_loading; the job receives the tensors
over gloo instead). Prints process
CPU seconds per step for each phase over the steps after ``--warmup``, and a digest of
every sampled token, log-prob and top-k id, so that an A/B of an engine change shows
both the cost and that the samples did not change. No sockets, no other roles.

    python bench/actor_step.py loss.kl_loss=topk teacher.top_k=16 loss.pg_coef=0 learner.batch_size=128
    python bench/actor_step.py --profile /tmp/actor.prof ...   # cProfile of the timed steps
    python bench/actor_step.py --config-name smollm2 --steps 3 --warmup 1 [actor.cpu_gemm=plain]
    python bench/actor_step.py --ab ...   # vLLM shortcuts on / off on alternate steps, one process

With ``--ab`` the steps alternate between the engine as built (``on``: the shortcuts of
asyncopd.actor.vllm_shortcuts and the rendered prompt input) and vLLM's own code
(``off``: shortcuts removed, prompts as ``TokensPrompt``), switched between steps, when
no request is in flight; both variants are printed (per step of their own); the digest covers
every step, so it must equal that of a run without ``--ab``.

Last line: ``actor_step total <core-s/step> generate <> ship <> reload <> digest <hex>``.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-name", default="default")
    parser.add_argument("--steps", type=int, default=25, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--profile", default=None, help="write a cProfile of the timed steps here")
    parser.add_argument("--no-reload", action="store_true", help="skip the weight load between steps")
    parser.add_argument("--ab", action="store_true", help="alternate vLLM shortcuts on/off per step")
    parser.add_argument("--ab-parts", default="draws,logprobs,ids,input",
                        help="with --ab: the shortcuts that the 'off' steps take back (comma-separated)")
    args, overrides = parser.parse_known_args()

    from asyncopd.launch import compose_config

    cfg = compose_config(["--config-name", args.config_name, *overrides])
    from asyncopd.actor.engine import engine_environment

    # This script is its own launcher: the engine's environment is set before vLLM loads.
    os.environ.update(engine_environment(cfg.cluster.actor_threads,
                                         onednn_cache_capacity=cfg.actor.onednn_cache_capacity))
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from asyncopd.actor.engine import VllmEngine, fix_malloc_mmap_threshold
    from asyncopd.seeds import job_seeds
    from asyncopd.tasks import load_task
    from asyncopd.launch import resolve_model_paths
    from asyncopd.transport import codec
    from asyncopd.types import Rollout

    fix_malloc_mmap_threshold(cfg.actor.malloc_mmap_threshold)
    student, _ = resolve_model_paths(cfg)
    tokenizer = AutoTokenizer.from_pretrained(student)
    seeds = job_seeds(cfg)
    task = load_task(cfg.task, tokenizer=tokenizer, replicate=seeds.prompt_order)
    engine = VllmEngine(str(student), cfg.actor, dtype=cfg.model.student.dtype, seed=seeds.actor,
                        top_k=cfg.teacher.top_k)
    weights = {n: p.detach().clone() for n, p in
               AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).named_parameters()}
    prompts = task.train_prompts(0, 1, start=0)
    batch = cfg.learner.batch_size
    variants = ["on", "off"] if args.ab else ["on"]
    digest = hashlib.sha256()  # over every step, whichever variant ran it
    phases = {v: {"generate": 0.0, "ship": 0.0, "reload": 0.0} for v in variants}
    timed_steps = dict.fromkeys(variants, 0)
    step_totals: dict[str, list[float]] = {v: [] for v in variants}
    profiler = cProfile.Profile() if args.profile else None
    num_engine_steps = 0
    for step in range(args.warmup + args.steps):
        timed = step >= args.warmup
        variant = variants[step % len(variants)]
        if args.ab:
            _set_shortcuts(engine, variant == "on", set(args.ab_parts.split(",")))
        if timed and profiler is not None and step == args.warmup:
            profiler.enable()
        t0 = time.process_time()
        chosen = [next(prompts) for _ in range(batch)]
        ids = tokenizer([p.text for p in chosen], add_special_tokens=False)["input_ids"]
        by_id = {}
        for group, (prompt, prompt_ids) in enumerate(zip(chosen, ids)):
            request_id = f"0-t{step * batch + group}.0"
            seed = (seeds.actor * 1_000_003 + (step * batch + group) * 7_919) % (2**31)
            engine.add(request_id, prompt_ids, seed=seed)
            by_id[request_id] = (prompt, prompt_ids)
        completions = []
        while engine.num_unfinished:
            completions.extend(engine.step(step))
            num_engine_steps += timed
        t1 = time.process_time()
        for c in completions:
            prompt, prompt_ids = by_id[c.request_id]
            text = tokenizer.decode(c.token_ids.tolist(), skip_special_tokens=True)
            versions = c.token_policy_versions
            rollout = Rollout(
                rollout_id=c.request_id, kind="train", batch_index=step, group_id=0, actor_index=0,
                prompt_ids=np.asarray(prompt_ids, dtype=np.int32), response_ids=c.token_ids,
                behaviour_logprobs=c.logprobs, token_policy_versions=versions, policy_version=int(versions.min()),
                reward=float(task.reward(prompt, text)), finish_reason=c.finish_reason,
                student_topk_ids=c.topk_ids)
            codec.encode(rollout)
        t2 = time.process_time()
        if not args.no_reload:
            with torch.no_grad():  # a new policy each step, as after an optimiser step
                for tensor in weights.values():
                    tensor.mul_(1.0 + 1e-4)
            engine.load_weights(weights.items())
        t3 = time.process_time()
        for c in sorted(completions, key=lambda c: c.request_id):
            digest.update(c.request_id.encode())
            digest.update(c.token_ids.tobytes())
            digest.update(c.logprobs.tobytes())
            digest.update(c.token_policy_versions.tobytes())
            if c.topk_ids is not None:
                digest.update(c.topk_ids.tobytes())
        if timed:
            timed_steps[variant] += 1
            step_totals[variant].append(t3 - t0)
            phases[variant]["generate"] += t1 - t0
            phases[variant]["ship"] += t2 - t1
            phases[variant]["reload"] += t3 - t2
    if args.ab:
        ratios = sorted(a / b for a, b in zip(step_totals["on"], step_totals["off"]))
        print(f"actor_step pairs on/off: median {ratios[len(ratios) // 2]:.3f} "
              f"(quartiles {ratios[len(ratios) // 4]:.3f}-{ratios[3 * len(ratios) // 4]:.3f}, {len(ratios)} pairs)")
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.profile)
        stats = pstats.Stats(profiler)
        stats.sort_stats("tottime").print_stats(35)
        stats.sort_stats("cumulative").print_stats(45)
    engine.shutdown()
    for variant in variants:
        n = max(1, timed_steps[variant])
        per = {k: v / n for k, v in phases[variant].items()}
        label = f"actor_step[{variant}]" if args.ab else "actor_step"
        print(f"{n} steps x {batch} samples, {num_engine_steps / max(1, args.steps):.1f} engine steps per step; "
              f"CPU s per step: " + ", ".join(f"{k} {v:.4f}" for k, v in per.items()))
        print(f"{label} total {sum(per.values()):.4f} generate {per['generate']:.4f} ship {per['ship']:.4f} "
              f"reload {per['reload']:.4f} digest {digest.hexdigest()[:16]}")
    return 0


def _set_shortcuts(engine, on: bool, parts: set[str]) -> None:
    """The engine as built (``on``) or with vLLM's own code in the place of the shortcuts
    named in ``parts`` (draws, logprobs, ids, input)."""
    from asyncopd.actor import engine as engine_module
    from asyncopd.actor import vllm_shortcuts as shortcuts

    llm = engine._engine
    if not hasattr(engine_module, "_bench_tokens_input"):
        engine_module._bench_tokens_input = engine_module._tokens_input
    from vllm.inputs import TokensPrompt

    if "logprobs" in parts:
        (shortcuts.install_flat_logprobs_append if on else shortcuts.remove_flat_logprobs_append)()
    if "ids" in parts:
        (shortcuts.install_counter_request_ids if on else shortcuts.remove_counter_request_ids)(llm)
    if "draws" in parts:
        llm.collective_rpc(shortcuts.install_seeded_draws if on else shortcuts.remove_seeded_draws)
    if "input" in parts:
        engine_module._tokens_input = (engine_module._bench_tokens_input if on
                                       else lambda ids: TokensPrompt(prompt_token_ids=ids))


if __name__ == "__main__":
    sys.exit(main())
