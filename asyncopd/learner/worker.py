"""The learner role: FSDP2 over the learner ranks, one optimiser step per batch.

::

    batch = buffer.next_batch(step)          (rank 0; shared with the other learner ranks)
    metrics = train_step(local shard)        (every learner rank, FSDP2 collectives)
    publish_weights(step + 1)                (all gather; rank 0 broadcasts to the actors)
    maybe_checkpoint(); log(metrics)

Learner ranks form their own default process group (the actors' in-process vLLM
engines own theirs), so the FSDP mesh is exactly the learner ranks. Rank 0 also
owns the I/O (:mod:`asyncopd.learner.io`): inbox, buffer, eval results,
metrics, weight announcements and the final shutdown of every role.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from asyncopd import trace
from asyncopd.config import JobConfig, LossConfig
from asyncopd.learner.batching import TrainSample, topk_overlap
from asyncopd.learner.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from asyncopd.learner.evaluation import EvalAccumulator, EvalExample
from asyncopd.learner.io import LearnerIO
from asyncopd.learner.advantages import sequence_advantages
from asyncopd.learner.model import iter_full_weights, load_student, make_mesh, shard_model
from asyncopd.learner.train import make_optimizer, train_step
from asyncopd.metrics import MetricsWriter
from asyncopd.quality import Verdict, collapse_verdict
from asyncopd.transport import codec
from asyncopd.transport.discovery import Rendezvous, read_teacher_references
from asyncopd.transport.weights import WeightGroup, broadcast_weights, plan_buckets
from asyncopd.types import ScoredRollout, TensorSpec, WeightUpdate

__all__ = ["run_learner"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _share_batch(batch: list[ScoredRollout] | None, rank: int, world_size: int) -> list[ScoredRollout]:
    """Learner rank 0's batch, on every learner rank (msgpack bytes over gloo)."""
    if world_size == 1:
        assert batch is not None
        return batch
    if rank == 0:
        payload = torch.frombuffer(bytearray(codec.encode_batch(batch)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
    else:
        size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0)
    if rank != 0:
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0)
    return batch if rank == 0 else codec.decode_batch(payload.numpy().tobytes())


def _train_samples(batch: list[ScoredRollout], loss_cfg: LossConfig) -> list[TrainSample]:
    """The batch as learner samples, with each sequence's base advantage (GRPO
    groups / REINFORCE++ whitening) computed over the whole batch."""
    rewards = np.array([s.rollout.reward for s in batch], dtype=np.float32)
    group_ids = np.array([s.rollout.group_id for s in batch], dtype=np.int64)
    advantages = sequence_advantages(rewards, group_ids, loss_cfg)
    return [TrainSample.from_scored(s, adv_base=float(a)) for s, a in zip(batch, advantages)]


def _batch_metrics(batch: list[ScoredRollout]) -> dict[str, float]:
    if not batch:
        return {"batch/samples": 0}
    return {
        "batch/samples": len(batch),
        "batch/reward_mean": float(np.mean([s.rollout.reward for s in batch])),
        "batch/response_tokens_mean": float(np.mean([s.rollout.response_ids.shape[0] for s in batch])),
        "teacher/score_s": float(sum(s.score_s for s in batch)),
        "teacher/rkl_behaviour": float(np.mean(np.concatenate(
            [s.rollout.behaviour_logprobs - s.teacher_logprobs for s in batch]))),
        **_topk_metrics(batch),
    }


def _topk_metrics(batch: list[ScoredRollout]) -> dict[str, float]:
    with_topk = [s for s in batch if s.topk_ids is not None and s.rollout.student_topk_ids is not None]
    if not with_topk:
        return {}
    overlap = np.concatenate([topk_overlap(s.rollout.student_topk_ids, s.topk_ids) for s in with_topk])
    return {"learner/topk_overlap": float(overlap.mean())} if overlap.size else {}


class Learner:
    """Model, optimiser and the step loop of one learner rank."""

    def __init__(self, cfg: JobConfig, index: int, rendezvous: Rendezvous, student_path: str, *,
                 buffer, num_eval_prompts: int) -> None:
        self.created = time.perf_counter()
        self.cfg, self.index, self.rendezvous = cfg, index, rendezvous
        self.world = cfg.cluster.learners
        self.student_path = student_path
        self.run_dir = cfg.run.run_dir
        self.serve_dtype = cfg.model.student.dtype
        torch.manual_seed(cfg.learner.seed)
        self.model = load_student(student_path, torch.float32)  # fp32 master weights; compute in param_dtype
        shard_model(self.model, make_mesh("cpu"), _DTYPES[cfg.learner.param_dtype])
        self.optimizer = make_optimizer(self.model, cfg.learner)
        resumed = self._maybe_resume()
        self.policy_version = int(resumed.get("policy_version", 0))
        self.start_version = self.policy_version
        self.samples_trained = int(resumed.get("samples_trained", 0))
        self.io: LearnerIO | None = None
        self.metrics: MetricsWriter | None = None
        self.evals: dict[int, dict[str, float]] = {}
        if index == 0:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(student_path)  # decodes the samples.jsonl pairs
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
            self.metrics = MetricsWriter(self.run_dir, config=cfg.to_dict(), total_steps=cfg.learner.num_steps,
                                         initial_step=self.policy_version, wandb_mode=cfg.run.wandb,
                                         progress=cfg.run.progress, run_name=cfg.run.name)
            evaluation = EvalAccumulator(num_eval_prompts, cfg.eval.rkl_samples, num_examples=cfg.eval.logged_samples)
            self.io = LearnerIO(cfg, rendezvous, buffer=buffer, evaluation=evaluation, on_eval=self._on_eval)
        specs = [TensorSpec(name, tuple(t.shape), self.serve_dtype)
                 for name, t in iter_full_weights(self.model, _DTYPES[self.serve_dtype])]
        self.buckets = plan_buckets(specs, int(cfg.learner.weight_sync_bucket_mb * 2**20))
        self.weight_group = (WeightGroup(rendezvous.store, 0, 1 + cfg.cluster.actors,
                                         cfg.learner.weight_sync_timeout_s) if index == 0 else None)

    def _maybe_resume(self) -> dict[str, Any]:
        resume = self.cfg.learner.resume
        if resume is None:
            return {}
        path = latest_checkpoint(self.run_dir) if resume == "latest" else Path(resume)
        if path is None:
            raise FileNotFoundError(f"learner.resume=latest but {self.run_dir}/checkpoints holds no complete "
                                    "checkpoint. Fix: drop learner.resume or point it at a checkpoint directory.")
        extra = load_checkpoint(path, self.model, self.optimizer)
        torch.set_rng_state(torch.tensor(extra["torch_rng_state"], dtype=torch.uint8))
        logger.info("resumed from %s at policy version %d", path, extra["policy_version"])
        return extra

    def _expect_teacher_references(self) -> None:
        """Rank 0: how many teacher samples each evaluation scores (teacher rank 0
        published them before the roles connected)."""
        if self.index != 0 or not self.cfg.eval.enabled:
            return
        references = read_teacher_references(self.rendezvous, self.cfg.cluster.teachers)
        self.io.evaluation.num_references = len(references.references)
        if references.skipped_reason:
            logger.warning("evaluation without teacher samples (%s): no eval/teacher_sample_nll; the collapse "
                           "verdict compares the student with its own start", references.skipped_reason)

    def verdict(self) -> Verdict:
        """The collapse rule (asyncopd/quality.py) on this run's first and latest evaluation."""
        if not self.evals:
            return Verdict("unknown")
        return collapse_verdict(self.evals.get(self.start_version, {}), self.evals[max(self.evals)])

    def _on_eval(self, metrics: dict[str, float]) -> None:
        version = int(metrics["eval/policy_version"])
        self.evals[version] = metrics
        verdict = self.verdict() if version == max(self.evals) else Verdict("unknown")
        metrics["eval/collapse"] = float(verdict.status == "collapse")
        assert self.metrics is not None
        self.metrics.log(metrics, step=version)
        self.metrics.log_samples(self._decoded(self.io.evaluation.examples.pop(version, [])), step=version)
        self.metrics.write_line(f"eval @ policy version {version}: {_eval_line(metrics)}")
        if verdict.status in ("collapse", "worse"):
            self.metrics.write_line(f"WARNING: eval @ policy version {version}: {verdict.describe()}")

    def _decoded(self, examples: list[EvalExample]) -> list[dict[str, Any]]:
        def text(ids: np.ndarray | None) -> str | None:
            return None if ids is None else self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)

        return [{"prompt_index": e.prompt_index, "prompt": text(e.prompt_ids), "student": text(e.student_ids),
                 "student_finish": e.student_finish, "student_greedy": text(e.greedy_ids),
                 "teacher": text(e.teacher_ids), "teacher_finish": e.teacher_finish} for e in examples]

    def publish_weights(self) -> float:
        """Every learner rank gathers; rank 0 streams the buckets to the actors."""
        tensors = iter_full_weights(self.model, _DTYPES[self.serve_dtype])
        if self.index != 0:
            for _ in tensors:
                pass
            return 0.0
        update = WeightUpdate(policy_version=self.policy_version, buckets=self.buckets)
        self.io.announce(update)
        return broadcast_weights(self.weight_group, update, tensors)

    def _checkpoint(self) -> None:
        path = self.run_dir / "checkpoints" / f"step_{self.policy_version}"
        extra = {"policy_version": self.policy_version, "samples_trained": self.samples_trained,
                 "torch_rng_state": torch.get_rng_state().tolist(),
                 "prompt_cursor_groups_per_actor": self.policy_version * self.cfg.learner.batch_size
                 // self.cfg.actor.samples_per_prompt // self.cfg.cluster.actors}
        save_checkpoint(path, self.model, self.optimizer, extra)

    def step(self, previous_stats: dict) -> dict[str, Any]:
        step = self.policy_version
        start = time.perf_counter()
        with trace.span("wait_batch", step=step):
            batch = self.io.wait_batch(step) if self.index == 0 else None
        wait_s = time.perf_counter() - start
        batch = _share_batch(batch, self.index, self.world)
        samples = _train_samples(batch, self.cfg.loss)
        train_start = time.perf_counter()
        with trace.span("train", step=step):
            metrics = train_step(self.model, self.optimizer, samples, self.cfg.loss, self.cfg.learner,
                                 rank=self.index, dp_size=self.world, top_k=2 * self.cfg.teacher.top_k)
        train_s = time.perf_counter() - train_start
        self.policy_version += 1
        self.samples_trained += len(batch)
        with trace.span("publish_weights", version=self.policy_version):
            sync_s = self.publish_weights()
        every = self.cfg.learner.checkpoint_every
        if (every and self.policy_version % every == 0) or self.policy_version == self.cfg.learner.num_steps:
            with trace.span("checkpoint", version=self.policy_version):
                self._checkpoint()
        if self.index != 0:
            return metrics
        metrics.update(_batch_metrics(batch))
        metrics.update(self.io.buffer.stats.as_metrics())
        metrics.update(self.io.actor_metrics(previous_stats))
        metrics.update({"policy_version": self.policy_version, "samples_trained": self.samples_trained,
                        "timing/wait_s": wait_s, "timing/train_s": train_s, "timing/weight_sync_s": sync_s,
                        "timing/step_s": time.perf_counter() - start})
        return metrics

    def run(self) -> dict[str, Any] | None:
        self.rendezvous.barrier("connected")
        self._expect_teacher_references()
        started = time.perf_counter()
        self.publish_weights()  # actors start from the learner's weights (also after a resume)
        previous_stats: dict = {}
        while self.policy_version < self.cfg.learner.num_steps:
            metrics = self.step(previous_stats)
            if self.index == 0:
                previous_stats = dict(self.io.actor_stats)
                self.metrics.log(metrics, step=self.policy_version)
                self.metrics.advance(metrics)
        if self.cfg.learner.export_hf:
            export_hf(self.model, self.run_dir / "hf", self.student_path)
        if self.index != 0:
            return None
        if self.cfg.eval.enabled:
            self.io.wait_eval(self.policy_version, self.cfg.teacher.request_timeout_s * 4)
        summary = self._summary(wall_s=time.perf_counter() - self.created, train_wall_s=time.perf_counter() - started)
        self.io.shutdown(self.policy_version, "training finished")
        self.metrics.close()
        if self.cfg.run.trace:
            logger.info("timeline: %s (open in https://ui.perfetto.dev)", trace.merge(self.run_dir))
        return summary

    def _summary(self, *, wall_s: float, train_wall_s: float) -> dict[str, Any]:
        before = self.evals.get(self.start_version, {})
        after = self.evals.get(self.policy_version, {})
        stats = self.io.buffer.stats
        verdict = self.verdict()
        summary = {
            "eval/verdict": verdict.status,
            "eval/verdict_reasons": list(verdict.reasons),
            **{f"{key}_{when}": evaluation.get(key) for key in _SUMMARY_EVAL_KEYS
               for when, evaluation in (("before", before), ("after", after))},
            "eval/teacher_distinct2": after.get("eval/teacher_distinct2"),
            "eval/teacher_repetition": after.get("eval/teacher_repetition"),
            "eval/teacher_self_nll": after.get("eval/teacher_self_nll"),
            "async/max_staleness": self.cfg.async_.max_staleness,
            "async/schedule": self.cfg.async_.schedule,
            "buffer/staleness_max": stats.staleness_max,
            "samples_trained": self.samples_trained,
            "samples_dropped_stale": stats.dropped_stale,
            "samples_dropped_other": stats.dropped_late + stats.dropped_full,
            "policy_version": self.policy_version,
            "start_policy_version": self.start_version,
            "wall_s": wall_s,
            "train_wall_s": train_wall_s,
            **{k: v for k, v in self.io.actor_metrics({}).items() if k != "actor/tokens_per_s"},
        }
        summary = {k: None if isinstance(v, float) and not np.isfinite(v) else v for k, v in summary.items()}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))  # strict JSON: no NaN
        return summary


def run_learner(cfg: JobConfig, index: int, rendezvous: Rendezvous, student_path: str, *,
                buffer, num_eval_prompts: int) -> None:
    """The learner role's main."""
    dist.init_process_group("gloo", store=dist.PrefixStore("asyncopd/learners", rendezvous.store),
                            rank=index, world_size=cfg.cluster.learners)
    learner = Learner(cfg, index, rendezvous, student_path, buffer=buffer, num_eval_prompts=num_eval_prompts)
    try:
        summary = learner.run()
        if summary is not None:
            _print_summary(summary, learner.run_dir)
    finally:
        if learner.io is not None:
            learner.io.close()
        dist.destroy_process_group()


_SUMMARY_EVAL_KEYS = ("eval/accuracy", "eval/rkl", "eval/teacher_sample_nll", "eval/forward_kl", "eval/distinct2",
                      "eval/repetition", "eval/response_tokens", "eval/eos_rate")
"""Eval metrics that summary.json reports before and after training (``<key>_before``, ``<key>_after``)."""


def _eval_line(m: dict[str, Any]) -> str:
    line = f"accuracy {m['eval/accuracy']:.3f}, reverse KL {m['eval/rkl']:.4f}, distinct-2 {m['eval/distinct2']:.3f}"
    if "eval/teacher_sample_nll" in m:
        line += (f" (teacher {m['eval/teacher_distinct2']:.3f}), NLL of teacher samples "
                 f"{m['eval/teacher_sample_nll']:.4f} (teacher's own {m['eval/teacher_self_nll']:.4f})")
    return line


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)

    def row(label: str, key: str) -> str:
        return f"   {label:<24}{fmt(summary[key + '_before'])} -> {fmt(summary[key + '_after'])}"

    lines = [
        f"== asyncopd run finished: {run_dir}",
        row("held-out accuracy", "eval/accuracy"),
        row("reverse KL / token", "eval/rkl"),
        row("NLL of teacher samples", "eval/teacher_sample_nll")
        + f" (teacher's own {fmt(summary['eval/teacher_self_nll'])})",
        row("distinct-2", "eval/distinct2") + f" (teacher {fmt(summary['eval/teacher_distinct2'])})",
        row("repetition rate", "eval/repetition") + f" (teacher {fmt(summary['eval/teacher_repetition'])})",
        f"   staleness max {summary['buffer/staleness_max']} (bound {summary['async/max_staleness']}), "
        f"samples trained {summary['samples_trained']}, dropped stale {summary['samples_dropped_stale']}, "
        f"wall {summary['wall_s']:.1f}s",
    ]
    for line in lines:
        logger.info("%s", line)
    verdict = Verdict(summary["eval/verdict"], tuple(summary["eval/verdict_reasons"]))
    if verdict.status == "collapse":
        logger.warning("   verdict: %s. Lower eval/rkl does not mean a better student here; see samples.jsonl.",
                       verdict.describe())
    elif verdict.status == "worse":
        logger.warning("   verdict: %s. The student moved away from the teacher; see samples.jsonl.",
                       verdict.describe())
    else:
        logger.info("   verdict: %s", verdict.describe())
