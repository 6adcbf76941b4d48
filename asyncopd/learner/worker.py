"""The learner role: FSDP2 over the learner ranks, one optimiser step per batch.

::

    batch = buffer.next_batch(step)          (rank 0; shared with the other learner ranks)
    metrics = train_step(local shard)        (every learner rank, FSDP2 collectives)
    publish_weights(step + 1)                (all gather; rank 0 broadcasts to the actors)
    log(metrics); maybe_checkpoint()         (by steps, by wall time, at the end)

Learner ranks form their own default process group (the actors' in-process vLLM
engines own theirs), so the FSDP mesh is exactly the learner ranks. Rank 0 also
owns the I/O (:mod:`asyncopd.learner.io`): inbox, buffer, eval results,
metrics, weight announcements and the final shutdown of every role.

Start and restart (:mod:`asyncopd.learner.resume`): with ``learner.resume=auto``
the learner continues from the run's newest checkpoint (weights, optimiser,
counters, RNG, buffered samples), supersedes the metrics records written after
it, and tells the actors where to start (a ResumePoint in the store), so that a
job under ``torchrun --max-restarts`` resumes exactly.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch
import torch.distributed as dist
import yaml

from asyncopd import trace
from asyncopd.config import JobConfig, LossConfig
from asyncopd.learner.batch_metrics import batch_metrics
from asyncopd.learner.batching import TrainSample
from asyncopd.learner.checkpoint import export_hf, load_checkpoint, save_checkpoint
from asyncopd.learner.summary import eval_line, print_summary, run_summary
from asyncopd.learner.resume import (BUFFER_FILE, RESUMES_FILE, check_compatible, job_shape, record_resume,
                                     resolve_checkpoint, set_aside_checkpoints)
from asyncopd.learner.evaluation import EvalAccumulator, EvalExample
from asyncopd.learner.io import LearnerIO
from asyncopd.learner.advantages import sequence_advantages
from asyncopd.learner.device import build_student, init_learner_group, limit_memory, resolve_param_dtype
from asyncopd.learner.model import iter_full_weights, model_device
from asyncopd.learner.teacher import ColocatedTeacher
from asyncopd.placement import Placement, rank_device
from asyncopd.learner.train import make_optimizer, train_step
from asyncopd.metrics import MetricsWriter, supersede_metrics
from asyncopd.quality import Verdict, collapse_verdict
from asyncopd.references import publish_hf_references
from asyncopd.seeds import job_seeds
from asyncopd.transport import codec
from asyncopd.transport.discovery import Rendezvous, read_teacher_references
from asyncopd.transport.weights import WeightGroup, broadcast_weights, connect_store, plan_buckets, store_address
from asyncopd.types import ResumePoint, Rollout, ScoredRollout, TensorSpec, WeightUpdate

__all__ = ["run_learner"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Cumulative actor counters a checkpoint carries over to the restarted actors' own.
_ACTOR_COUNTERS = ("actor/tokens_generated", "actor/retries", "actor/rollouts_unscored", "actor/rejected_messages")


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
    lengths = np.array([s.rollout.response_ids.shape[0] for s in batch], dtype=np.int64)
    advantages = sequence_advantages(rewards, group_ids, loss_cfg, response_lengths=lengths)
    return [TrainSample.from_scored(s, adv_base=float(a)) for s, a in zip(batch, advantages)]


class Learner:
    """Model, optimiser and the step loop of one learner rank."""

    def __init__(self, cfg: JobConfig, index: int, rendezvous: Rendezvous, student_path: str, *,
                 buffer, num_eval_prompts: int, teacher_path: str | None = None,
                 placement: Placement | None = None) -> None:
        self.created = time.perf_counter()
        self.cfg, self.index, self.rendezvous = cfg, index, rendezvous
        self.world = cfg.cluster.learners
        self.student_path = student_path
        self.run_dir = cfg.run.run_dir
        self.serve_dtype = cfg.model.student.dtype
        torch.manual_seed(job_seeds(cfg).learner)
        self.placement = placement
        self.device = torch.device(rank_device(None if placement is None else placement.for_rank(index)))
        # fp32 master weights; compute in param_dtype (bf16 by default on GPU).
        self.model = build_student(student_path, self.device,
                                   resolve_param_dtype(cfg.learner.param_dtype, self.device),
                                   activation_checkpointing=cfg.learner.activation_checkpointing)
        self.optimizer = make_optimizer(self.model, cfg.learner)
        self.teacher: ColocatedTeacher | None = None
        if cfg.teacher.backend == "colocated":
            assert teacher_path is not None, "teacher.backend=colocated loads model.teacher.path in the learner"
            self.teacher = ColocatedTeacher(teacher_path, dtype=cfg.model.teacher.dtype,
                                            device=model_device(self.model),
                                            student_vocab_size=self.model.get_output_embeddings().weight.shape[0])
        self.resumed_from: Path | None = None
        resumed, restored = self._maybe_resume()
        self.policy_version = int(resumed.get("policy_version", 0))
        self.start_version = self.policy_version
        self.run_start_version = int(resumed.get("run_start_version", self.policy_version))
        self.samples_trained = int(resumed.get("samples_trained", 0))
        self.samples_regenerated = 0  # both from resumes.jsonl (every resume, whichever checkpoint it used)
        self.num_resumes = 0
        self.last_checkpoint_time = time.monotonic()
        self.actor_offsets: dict[str, float] = dict(resumed.get("actor_counters", {}))
        self.io: LearnerIO | None = None
        self.metrics: MetricsWriter | None = None
        self.evals: dict[int, dict[str, float]] = {}
        if index == 0:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(student_path)  # decodes the samples.jsonl pairs
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict()))))
            self._continue_metrics(resumed)
            self.metrics = MetricsWriter(self.run_dir, config=cfg.to_dict(), total_steps=cfg.learner.num_steps,
                                         initial_step=self.policy_version, wandb_mode=cfg.run.wandb,
                                         progress=cfg.run.progress, run_name=cfg.run.name)
            evaluation = EvalAccumulator(num_eval_prompts, cfg.eval.rkl_samples, num_examples=cfg.eval.logged_samples)
            evaluation.completed.update(self.evals)
            if resumed:
                buffer.restore(restored, {int(k): v for k, v in resumed.get("dropped_slots", {}).items()},
                               resumed.get("buffer_counters"))
            self.io = LearnerIO(cfg, rendezvous, buffer=buffer, evaluation=evaluation, on_eval=self._on_eval,
                                score=None if self.teacher is None else self._score)
            first_batch = int(resumed.get("first_batch", self.policy_version))
            rendezvous.publish("resume", msgspec.json.encode(ResumePoint(
                policy_version=self.policy_version, run_start_version=self.run_start_version,
                first_batch=first_batch, evaluated=sorted(self.evals))).decode())
            if self.teacher is not None and cfg.eval.enabled:  # no teacher ranks: the references are ours to make
                publish_hf_references(cfg, rendezvous, self.teacher.model, self.tokenizer, who="learner 0")
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
        # Every actor engine's workers join; the placement knows their count (1 on the CPU).
        tp = 1 if self.placement is None else self.placement.for_rank(self.cfg.cluster.learners).tensor_parallel_size
        prefix = f"asyncopd/weight_group/{uuid.uuid4().hex}"  # fresh keys for every job attempt
        self.rendezvous.publish("weights/group_prefix", prefix)
        host, port = store_address(self.rendezvous.store)
        return WeightGroup(connect_store(host, port, self.cfg.learner.weight_sync_timeout_s), 0,
                           1 + self.cfg.cluster.actors * tp, self.cfg.learner.weight_sync_timeout_s,
                           carrier=carrier, device=self.device if carrier != "gloo" else "cpu", prefix=prefix)

    def _score(self, rollouts: list[Rollout]) -> list[np.ndarray]:
        assert self.teacher is not None
        return self.teacher.score(rollouts, self.cfg.teacher.max_batch_tokens)

    def _maybe_resume(self) -> tuple[dict[str, Any], list[ScoredRollout]]:
        """Load the checkpoint learner.resume names (every learner rank); returns its
        extra state and (rank 0) the buffered samples it holds."""
        cfg = self.cfg
        if cfg.learner.resume is None and self.index == 0:
            set_aside_checkpoints(self.run_dir)
        path = resolve_checkpoint(cfg.learner.resume, self.run_dir)
        if path is None:
            logger.info("starting afresh (learner.resume=%s, no checkpoint in %s)", cfg.learner.resume, self.run_dir)
            return {}, []
        extra = json.loads((path / "extra.json").read_text()) if (path / "extra.json").is_file() else {}
        check_compatible(extra.get("job_shape", {}), cfg, path)
        extra = load_checkpoint(path, self.model, self.optimizer)
        torch.set_rng_state(torch.tensor(extra["torch_rng_state"], dtype=torch.uint8))
        buffered = path / BUFFER_FILE
        restored = codec.decode_batch(buffered.read_bytes()) if self.index == 0 and buffered.is_file() else []
        self.resumed_from = path
        if extra["policy_version"] >= cfg.learner.num_steps and self.index == 0:
            logger.warning("%s already holds a finished run (policy version %d, learner.num_steps=%d): nothing to "
                           "train. Fix: raise learner.num_steps to train on, or give the job another run.name "
                           "(or learner.resume=null) to train afresh.", self.run_dir, extra["policy_version"],
                           cfg.learner.num_steps)
        logger.info("resumed from %s at policy version %d (%d buffered samples of steps %d..%d restored)", path,
                    extra["policy_version"], len(restored), extra["policy_version"],
                    extra.get("first_batch", extra["policy_version"]) - 1)
        return extra, restored

    def _continue_metrics(self, resumed: dict[str, Any]) -> None:
        """metrics.jsonl keeps one line per step: records after the checkpoint move to
        metrics.superseded.jsonl (their steps are trained again); evaluations kept
        there count as done. Their samples count as regenerated."""
        kept, superseded = supersede_metrics(self.run_dir, self.policy_version if resumed else None,
                                             self.rendezvous.attempt)
        for record in kept:
            if "eval/policy_version" in record:
                self.evals[int(record["eval/policy_version"])] = {k: v for k, v in record.items()
                                                                  if k.startswith("eval/")}
        retrained = sum(int(r.get("batch/samples", 0)) for r in superseded if "learner/loss" in r)
        if not resumed and (self.cfg.learner.resume != "auto" or not retrained):
            (self.run_dir / RESUMES_FILE).unlink(missing_ok=True)  # a new run: no history of its own yet
            return
        # A resume, or (auto, no checkpoint yet) a restart of this run from scratch.
        regenerated = retrained + int(resumed.get("samples_beyond_first_batch", 0))
        self.num_resumes, self.samples_regenerated = record_resume(self.run_dir, {
            "attempt": self.rendezvous.attempt, "checkpoint": str(self.resumed_from),
            "policy_version": self.policy_version,
            "steps_superseded": sum(1 for r in superseded if "learner/loss" in r), "samples_regenerated": regenerated})

    def _expect_teacher_references(self) -> None:
        """Rank 0: how many teacher samples each evaluation scores (the rank holding the
        teacher published them before the roles connected)."""
        if self.index != 0 or not self.cfg.eval.enabled:
            return
        references = read_teacher_references(self.rendezvous)
        self.io.evaluation.num_references = len(references.references)
        if references.skipped_reason:
            logger.warning("evaluation without teacher samples (%s): no eval/teacher_sample_nll; the collapse "
                           "verdict compares the student with its own start", references.skipped_reason)

    def verdict(self) -> Verdict:
        """The collapse rule (asyncopd/quality.py) on this run's first and latest evaluation."""
        if not self.evals:
            return Verdict("unknown")
        return collapse_verdict(self.evals.get(self.run_start_version, {}), self.evals[max(self.evals)])

    def _on_eval(self, metrics: dict[str, float]) -> None:
        version = int(metrics["eval/policy_version"])
        self.evals[version] = metrics
        verdict = self.verdict() if version == max(self.evals) else Verdict("unknown")
        metrics["eval/collapse"] = float(verdict.status == "collapse")
        assert self.metrics is not None
        self.metrics.log(metrics, step=version)
        self.metrics.log_samples(self._decoded(self.io.evaluation.examples.pop(version, [])), step=version)
        self.metrics.write_line(f"eval @ policy version {version}: {eval_line(metrics)}")
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
        tensors = self._weights_to_send()
        if self.index != 0:
            for _ in tensors:
                pass
            return 0.0
        update = WeightUpdate(policy_version=self.policy_version, buckets=self.buckets)
        self.io.announce(update)
        return broadcast_weights(self.weight_group, update, tensors)

    def _actor_metrics(self, previous_stats: dict) -> dict[str, Any]:
        """The actors' counters, continued across restarts (a restarted actor counts from 0)."""
        metrics = self.io.actor_metrics(previous_stats)
        for key, offset in self.actor_offsets.items():
            if key in metrics:
                metrics[key] += offset
        return metrics

    def _checkpoint_due(self) -> bool:
        """By steps, by wall time (rank 0's clock, shared) or at the end."""
        learner = self.cfg.learner
        every, every_s = learner.checkpoint_every, learner.checkpoint_every_s
        due = (self.policy_version == learner.num_steps or bool(every and self.policy_version % every == 0)
               or (every_s is not None and time.monotonic() - self.last_checkpoint_time >= every_s))
        if self.world > 1:  # every learner rank must take part in the (collective) save
            flag = torch.tensor([int(due)], dtype=torch.int64)
            dist.broadcast(flag, src=0)
            due = bool(flag.item())
        return due

    def _checkpoint(self) -> None:
        """Weights, optimiser, counters, RNG and (rank 0) the samples of steps
        [v, first_batch) that older weights generated, waited for until complete."""
        v, num_steps = self.policy_version, self.cfg.learner.num_steps
        first_batch = min(v + self.cfg.async_.max_staleness, num_steps)
        extra: dict[str, Any] = {
            "policy_version": v, "samples_trained": self.samples_trained,
            "torch_rng_state": torch.get_rng_state().tolist(), "run_start_version": self.run_start_version,
            "first_batch": first_batch, "job_shape": job_shape(self.cfg)}
        files: dict[str, bytes] = {}
        if self.index == 0:
            steps = range(v, first_batch)
            self.io.wait_ready(steps)
            samples, dropped = self.io.buffer.snapshot(steps)
            files[BUFFER_FILE] = codec.encode_batch(samples)
            totals = self._actor_metrics({})
            extra.update(actor_counters={k: totals[k] for k in _ACTOR_COUNTERS if k in totals},
                         dropped_slots={str(k): n for k, n in dropped.items()},
                         buffer_counters=self.io.buffer.counters(),
                         samples_beyond_first_batch=self.io.buffer.num_held_from(first_batch))
        save_checkpoint(self.run_dir / "checkpoints" / f"step_{v}", self.model, self.optimizer, extra, files)
        self.last_checkpoint_time = time.monotonic()

    def maybe_checkpoint(self) -> None:
        if self._checkpoint_due():
            with trace.span("checkpoint", version=self.policy_version):
                self._checkpoint()

    def step(self, previous_stats: dict) -> dict[str, Any]:
        step = self.policy_version
        start = time.perf_counter()
        with trace.span("wait_batch", step=step):
            batch = self.io.wait_batch(step) if self.index == 0 else None
        wait_s = time.perf_counter() - start
        if batch is not None:  # arrival order is timing; a fixed order keeps a fixed_lag job reproducible
            batch = sorted(batch, key=lambda s: s.rollout_id)
        batch = _share_batch(batch, self.index, self.world)
        samples = _train_samples(batch, self.cfg.loss)
        train_start = time.perf_counter()
        with trace.span("train", step=step):
            metrics = train_step(self.model, self.optimizer, samples, self.cfg.loss, self.cfg.learner,
                                 rank=self.index, dp_size=self.world, top_k=2 * self.cfg.teacher.top_k,
                                 teacher=self.teacher)
        train_s = time.perf_counter() - train_start
        self.policy_version += 1
        self.samples_trained += len(batch)
        with trace.span("publish_weights", version=self.policy_version):
            sync_s = self.publish_weights()
        if self.index != 0:
            return metrics
        metrics.update(batch_metrics(batch))
        metrics.update(self.io.buffer.stats.as_metrics())
        metrics.update(self._actor_metrics(previous_stats))
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
            self.maybe_checkpoint()  # after the step's metrics line, which a resume keeps
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
        stats = self.io.buffer.stats
        summary = run_summary(
            self.cfg, before=self.evals.get(self.run_start_version, {}),  # the run's true start, across restarts
            after=self.evals.get(self.policy_version, {}), verdict=self.verdict(),
            actor_metrics=self._actor_metrics({}),
            counters={"buffer/staleness_max": stats.staleness_max, "samples_dropped_stale": stats.dropped_stale,
                      "samples_dropped_other": stats.dropped_late + stats.dropped_full,
                      "samples_dropped_surplus": stats.dropped_surplus, "samples_trained": self.samples_trained,
                      "policy_version": self.policy_version,
                      "start_policy_version": self.start_version, "run_start_policy_version": self.run_start_version,
                      "resumed_from": None if self.resumed_from is None else str(self.resumed_from),
                      "num_resumes": self.num_resumes, "samples_regenerated": self.samples_regenerated,
                      "wall_s": wall_s, "train_wall_s": train_wall_s})
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))  # strict JSON: no NaN
        return summary

def run_learner(cfg: JobConfig, index: int, rendezvous: Rendezvous, student_path: str, *,
                buffer, num_eval_prompts: int, teacher_path: str | None = None,
                placement: Placement | None = None) -> None:
    """The learner role's main. ``teacher_path``: the teacher loaded in process with
    teacher.backend=colocated (unused otherwise); ``placement``: the job's device plan
    (None: CPU)."""
    me = None if placement is None else placement.for_rank(index)
    device = torch.device(rank_device(me))
    init_learner_group(device, dist.PrefixStore("asyncopd/learners", rendezvous.store), index, cfg.cluster.learners)
    limit_memory(device, None if me is None else me.memory_fraction)
    learner = Learner(cfg, index, rendezvous, student_path, buffer=buffer, num_eval_prompts=num_eval_prompts,
                      teacher_path=teacher_path, placement=placement)
    try:
        summary = learner.run()
        if summary is not None:
            print_summary(summary, learner.run_dir)
    finally:
        if learner.io is not None:
            learner.io.close()
        dist.destroy_process_group()
