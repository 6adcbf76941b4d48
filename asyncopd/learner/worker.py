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
import uuid
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
from asyncopd.learner.evaluation import EvalAccumulator
from asyncopd.learner.io import LearnerIO
from asyncopd.learner.advantages import sequence_advantages
from asyncopd.learner.device import build_student, init_learner_group, limit_memory, resolve_param_dtype
from asyncopd.learner.model import iter_full_weights
from asyncopd.placement import Placement
from asyncopd.learner.train import make_optimizer, train_step
from asyncopd.metrics import MetricsWriter
from asyncopd.transport import codec
from asyncopd.transport.discovery import Rendezvous
from asyncopd.transport.weights import WeightGroup, broadcast_weights, connect_store, plan_buckets, store_address
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
                 buffer, num_eval_prompts: int, placement: Placement | None = None) -> None:
        self.created = time.perf_counter()
        self.cfg, self.index, self.rendezvous = cfg, index, rendezvous
        self.world = cfg.cluster.learners
        self.student_path = student_path
        self.run_dir = cfg.run.run_dir
        self.serve_dtype = cfg.model.student.dtype
        torch.manual_seed(cfg.learner.seed)
        self.placement = placement
        self.device = torch.device("cpu" if placement is None else placement.for_rank(index).device)
        # fp32 master weights; compute in param_dtype (bf16 by default on GPU).
        self.model = build_student(student_path, self.device,
                                   resolve_param_dtype(cfg.learner.param_dtype, self.device),
                                   activation_checkpointing=cfg.learner.activation_checkpointing)
        self.optimizer = make_optimizer(self.model, cfg.learner)
        resumed = self._maybe_resume()
        self.policy_version = int(resumed.get("policy_version", 0))
        self.start_version = self.policy_version
        self.samples_trained = int(resumed.get("samples_trained", 0))
        self.io: LearnerIO | None = None
        self.metrics: MetricsWriter | None = None
        self.evals: dict[int, dict[str, float]] = {}
        if index == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
            self.metrics = MetricsWriter(self.run_dir, config=cfg.to_dict(), total_steps=cfg.learner.num_steps,
                                         initial_step=self.policy_version, wandb_mode=cfg.run.wandb,
                                         progress=cfg.run.progress, run_name=cfg.run.name)
            self.io = LearnerIO(cfg, rendezvous, buffer=buffer, evaluation=EvalAccumulator(num_eval_prompts, cfg.eval.rkl_samples),
                                on_eval=self._on_eval)
        specs = [TensorSpec(name, tuple(t.shape), self.serve_dtype)
                 for name, t in self._weights_to_send()]
        self.buckets = plan_buckets(specs, int(cfg.learner.weight_sync_bucket_mb * 2**20))
        self.weight_group = self._join_weight_group() if index == 0 else None

    def _weights_to_send(self):
        """The full weights in the serving dtype, without a tied lm_head (the receiver
        ties it, or adds it from the embedding on vLLM's CPU build)."""
        tied = bool(getattr(self.model.config.get_text_config(), "tie_word_embeddings", False))
        return ((name, t) for name, t in iter_full_weights(self.model, _DTYPES[self.serve_dtype])
                if not (tied and name == "lm_head.weight"))

    def _join_weight_group(self) -> WeightGroup:
        """Learner rank 0 as member 0 of the weight group (blocks until the actors join)."""
        carrier = "gloo" if self.placement is None else self.placement.weight_carrier
        tp = self.cfg.cluster.gpus_per_actor if self.device.type == "cuda" else 1
        prefix = f"asyncopd/weight_group/{uuid.uuid4().hex}"  # fresh keys for every job attempt
        self.rendezvous.publish("weights/group_prefix", prefix)
        host, port = store_address(self.rendezvous.store)
        return WeightGroup(connect_store(host, port, self.cfg.learner.weight_sync_timeout_s), 0,
                           1 + self.cfg.cluster.actors * tp, self.cfg.learner.weight_sync_timeout_s,
                           carrier=carrier, device=self.device if carrier != "gloo" else "cpu", prefix=prefix)

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

    def _on_eval(self, metrics: dict[str, float]) -> None:
        version = int(metrics["eval/policy_version"])
        self.evals[version] = metrics
        assert self.metrics is not None
        self.metrics.log(metrics, step=version)
        self.metrics.write_line(f"eval @ policy version {version}: accuracy {metrics['eval/accuracy']:.3f}, "
                                f"reverse KL {metrics['eval/rkl']:.4f}")

    def publish_weights(self) -> float:
        """Every learner rank gathers; rank 0 streams the buckets to the actors."""
        tensors = self._weights_to_send()
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
        summary = {
            "eval/accuracy_before": before.get("eval/accuracy"),
            "eval/accuracy_after": after.get("eval/accuracy"),
            "eval/rkl_before": before.get("eval/rkl"),
            "eval/rkl_after": after.get("eval/rkl"),
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
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def run_learner(cfg: JobConfig, index: int, rendezvous: Rendezvous, student_path: str, *,
                buffer, num_eval_prompts: int, placement: Placement | None = None) -> None:
    """The learner role's main. ``placement``: the job's device plan (None: CPU)."""
    me = None if placement is None else placement.for_rank(index)
    device = torch.device("cpu" if me is None else me.device)
    init_learner_group(device, dist.PrefixStore("asyncopd/learners", rendezvous.store), index, cfg.cluster.learners)
    limit_memory(device, None if me is None else me.memory_fraction)
    learner = Learner(cfg, index, rendezvous, student_path, buffer=buffer, num_eval_prompts=num_eval_prompts,
                      placement=placement)
    try:
        summary = learner.run()
        if summary is not None:
            _print_summary(summary, learner.run_dir)
    finally:
        if learner.io is not None:
            learner.io.close()
        dist.destroy_process_group()


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = [
        f"== asyncopd run finished: {run_dir}",
        f"   held-out accuracy   {fmt(summary['eval/accuracy_before'])} -> {fmt(summary['eval/accuracy_after'])}",
        f"   reverse KL / token  {fmt(summary['eval/rkl_before'])} -> {fmt(summary['eval/rkl_after'])}",
        f"   staleness max {summary['buffer/staleness_max']} (bound {summary['async/max_staleness']}), "
        f"samples trained {summary['samples_trained']}, dropped stale {summary['samples_dropped_stale']}, "
        f"wall {summary['wall_s']:.1f}s",
    ]
    for line in lines:
        logger.info("%s", line)
