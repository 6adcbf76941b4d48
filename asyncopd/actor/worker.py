"""The actor role: keeps one vLLM engine full and ships every finished sample.

Loop, one engine step at a time::

    control inbox ─WeightUpdate─> engine.receive_weights (inside the vLLM worker: weight_receiver)
    prompts ─admit (slots, staleness bound)─> engine.step() ─RolloutBatch─> teacher pool (a DEALER each;
                                                   learner rank 0 with teacher.backend=colocated)
                                                   teacher ─ScoreAckBatch─> retry elsewhere / degrade
    (one RolloutBatch per teacher per engine step; acks, deadlines, retries per rollout)

Admission (slots). Each optimiser step ``k`` takes ``batch_size / num_actors``
samples from this actor, whole prompt groups at a time; the actor stamps them
``batch_index = k``. It admits a group for step ``k`` only when its weights allow:

- ``bounded``: ``k <= policy_version + max_staleness``; new weights are taken
  between engine steps, with requests in flight (their later tokens carry the
  new version), except while requests of a step the update makes due are in
  flight (``k <= update.policy_version``): the learner trains that step next, and
  a load would re-prefill its requests and make the learner wait for them (traced
  on the demo: a mid-batch load, then the next batch's prefill ahead of the last
  tokens the learner needed; it waited longer for them than it trained);
- ``fixed_lag``: ``max(0, k - max_staleness) <= policy_version``, and new weights
  are taken only when nothing is in flight and the next step needs them, so step
  ``k`` is generated entirely by version ``k - max_staleness``.

Either way the learner, which trains step ``k`` at version ``k``, sees staleness
at most ``max_staleness``.

Groups are admitted a few at a time, keeping at most ``2 * actor.max_num_seqs``
requests in the engine (enough to refill every slot a step frees): admitting a
whole batch at once after a weight load stalled the engine for the batch's input
processing (~0.4 ms a request on CPU) before its first token, and left the
teacher idle meanwhile. Held-out evaluation requests (greedy for accuracy, T=1
samples for reverse KL, and the teacher's own samples of those prompts, scored
teacher-forced for the NLL of teacher samples) are admitted whenever the engine
reaches an eval version; weights are not swapped under them.

Restarts. The learner says where this attempt starts (a
:class:`~asyncopd.types.ResumePoint` in the store): the prompt cursor begins at
its ``first_batch`` (earlier steps' samples survived in the checkpoint) and
evaluations already done are not redone. Request ids and sampling seeds follow
the slot (prompt group, sample, resample) rather than a per-process counter, so
a restarted actor draws the same samples as an uninterrupted one.

This module owns no model math and never imports another role.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace

import msgspec
import numpy as np
import zmq

from asyncopd import trace
from asyncopd.actor.teachers import TeacherPoolClient
from asyncopd.config import JobConfig
from asyncopd.placement import Placement
from asyncopd.seeds import job_seeds
from asyncopd.tasks import Prompt, Task
from asyncopd.transport.discovery import Rendezvous, ShutdownWatch, read_teacher_references
from asyncopd.transport.sockets import Channel, poll
from asyncopd.transport.weights import store_address
from asyncopd.types import ActorStats, ResumePoint, Rollout, Shutdown, TeacherReference, WeightUpdate

__all__ = ["ActorLoop", "eval_versions"]

logger = logging.getLogger(__name__)

_STATS_EVERY_S = 2.0


def eval_versions(cfg: JobConfig, start_version: int) -> set[int]:
    """Policy versions at which the held-out set is evaluated."""
    if not cfg.eval.enabled:
        return set()
    versions = {start_version, cfg.learner.num_steps}
    if cfg.eval.every_steps:
        versions.update(range(start_version, cfg.learner.num_steps + 1, cfg.eval.every_steps))
    return versions


@dataclass(slots=True)
class _Request:
    kind: str
    prompt: Prompt
    prompt_ids: list[int]
    group_id: int
    batch_index: int
    sample: int = 0
    """Which of the group's samples (train) or of the prompt's eval samples this is."""
    resample: int = 0
    """How often this slot was sampled again after its rollout went unscored."""
    reference: TeacherReference | None = None
    """eval_reference: the teacher sample to score."""
    slot_id: str | None = None
    """Set on a resample: the slot of the dropped sample it replaces."""


class ActorLoop:
    """State and steps of one actor; :func:`run_actor` calls :meth:`run_once` until shutdown."""

    def __init__(self, cfg: JobConfig, index: int, *, engine, task: Task, tokenizer, inbox: Channel,
                 dealer: Channel | Sequence[Channel], stats_out: Channel,
                 references: list[TeacherReference] | None = None, resume: ResumePoint | None = None,
                 weight_group: object = None) -> None:
        """``dealer``: one DEALER per teacher, each connected to that teacher only (one
        Channel: a pool of one). ``weight_group`` is unused (the engine's worker receives
        weights itself); kept so that older callers still work."""
        self.cfg, self.index, self.engine, self.task, self.tokenizer = cfg, index, engine, task, tokenizer
        self.weight_group, self.inbox, self.stats_out = weight_group, inbox, stats_out
        self.dealers = [dealer] if isinstance(dealer, Channel) else list(dealer)
        self.teachers = TeacherPoolClient(self.dealers, cfg.teacher, actor_index=index)
        self.references = {r.prompt_index: r for r in references or []}
        """The teacher's samples of the held-out prompts, by prompt index."""
        actor = cfg.actor
        self.group_size = actor.samples_per_prompt
        self.groups_per_step = cfg.learner.batch_size // actor.samples_per_prompt // cfg.cluster.actors
        self.admit_window = 2 * actor.max_num_seqs
        self.policy_version: int | None = None  # unknown until the learner's first weights arrive
        self.next_group = 0
        self.prompts = None
        self.pending_updates: deque[WeightUpdate] = deque()
        self.inflight: dict[str, _Request] = {}
        self.evaluated: set[int] = set()
        self.eval_due: set[int] = set()
        self.seq = 0
        self.sampler_seed = job_seeds(cfg).actor
        self.started = time.monotonic()
        self.last_stats = 0.0
        self.tokens_generated = 0
        self.engine_busy_s = 0.0
        self.weight_sync_s = 0.0
        self.resume = resume
        self.waiting_since = time.monotonic()

    @property
    def num_retries(self) -> int:
        return self.teachers.num_retries

    @property
    def num_unscored(self) -> int:
        return self.teachers.num_unscored

    @property
    def unacked(self) -> dict:
        """Rollouts sent to the teacher pool and not yet acknowledged, by rollout id."""
        return self.teachers.unacked

    # ---- admission ---------------------------------------------------------------------------
    def _batch_of(self, group: int) -> int:
        return group // self.groups_per_step

    def _may_admit(self, queued: int = 0) -> bool:
        """Whether the next group may enter the engine, ``queued`` requests being about to."""
        if self.policy_version is None or self.engine.num_unfinished + queued >= self.admit_window:
            return False
        k = self._batch_of(self.next_group)
        if k >= self.cfg.learner.num_steps:
            return False
        eta = self.cfg.async_.max_staleness
        if self.cfg.async_.schedule == "fixed_lag":
            return max(0, k - eta) <= self.policy_version
        return k <= self.policy_version + eta

    def _admit_groups(self) -> None:
        """Admit what the staleness bound and the admission window allow (one tokenizer call)."""
        admitted: list[tuple[Prompt, int, int]] = []
        while self._may_admit(queued=len(admitted) * self.group_size):
            admitted.append((next(self.prompts), self.next_group, self._batch_of(self.next_group)))
            self.next_group += 1
        if not admitted:
            return
        with trace.span("admit", groups=len(admitted)):
            for (prompt, group, k), ids in zip(admitted, self._encode([p for p, _, _ in admitted])):
                for j in range(self.group_size):
                    self._submit(_Request("train", prompt, ids, self.index + self.cfg.cluster.actors * group, k, j))

    def _encode(self, prompts: list[Prompt]) -> list[list[int]]:
        if not prompts:  # e.g. more actors than held-out prompts
            return []
        return [list(ids) for ids in self.tokenizer([p.text for p in prompts], add_special_tokens=False)["input_ids"]]

    def _submit(self, request: _Request) -> None:
        request_id, sample_seed = self._slot_id_and_seed(request)
        self.seq += 1
        if request.kind == "eval_reference":
            assert request.reference is not None
            self.engine.add_scoring(request_id, request.prompt_ids, request.reference.response_ids)
        elif request.kind == "eval_greedy":
            self.engine.add(request_id, request.prompt_ids, greedy=True)
        elif request.kind == "eval_sample":
            self.engine.add(request_id, request.prompt_ids, seed=sample_seed, temperature=1.0)
        else:
            self.engine.add(request_id, request.prompt_ids, seed=sample_seed)
        self.inflight[request_id] = request

    def _slot_id_and_seed(self, request: _Request) -> tuple[str, int]:
        """A job-unique request id and a sampling seed that depend on the slot only
        (not on how many requests this process made), so a restart resamples alike."""
        if request.kind == "train":
            slot, where = f"t{request.group_id}", request.group_id
        else:  # eval: the version under evaluation and the held-out prompt
            kind = {"eval_greedy": "g", "eval_sample": "e", "eval_reference": "f"}[request.kind]
            slot, where = f"{kind}{request.batch_index}.{request.prompt.index}", (
                2**30 + request.batch_index * 1_000_003 + request.prompt.index)
        request_id = f"{self.index}-{slot}.{request.sample}" + (f"r{request.resample}" if request.resample else "")
        seed = self.sampler_seed * 1_000_003 + where * 7_919 + request.sample * 131 + request.resample * 17
        return request_id, seed % (2**31)

    def _admit_eval(self, version: int) -> None:
        prompts = self.task.eval_prompts()[self.index::self.cfg.cluster.actors]
        for prompt, ids in zip(prompts, self._encode(prompts)):
            self._submit(_Request("eval_greedy", prompt, ids, prompt.index, version))
            for j in range(self.cfg.eval.rkl_samples):
                self._submit(_Request("eval_sample", prompt, ids, prompt.index, version, sample=j))
            reference = self.references.get(prompt.index)
            if reference is not None:
                self._submit(_Request("eval_reference", prompt, reference.prompt_ids.tolist(), prompt.index,
                                      version, reference=reference))
        self.evaluated.add(version)
        logger.info("actor %d: evaluating policy version %d", self.index, version)

    # ---- weights -----------------------------------------------------------------------------
    def _eval_inflight(self) -> bool:
        return any(r.kind != "train" for r in self.inflight.values())

    def _may_apply_update(self, update: WeightUpdate) -> bool:
        if self._eval_inflight():
            return False
        if self.policy_version is None:
            return True
        if self.cfg.async_.schedule == "bounded":
            # In flight, unless it would re-prefill requests of the step the learner trains next.
            due = update.policy_version
            return not any(r.batch_index <= due for r in self.inflight.values() if r.kind == "train")
        # fixed_lag: only between batches, and only when the next batch needs newer weights.
        if self.inflight:
            return False
        k = self._batch_of(self.next_group)
        needed = max(0, k - self.cfg.async_.max_staleness)
        return k >= self.cfg.learner.num_steps or needed > self.policy_version

    def _apply_update(self, update: WeightUpdate) -> None:
        start = time.perf_counter()
        with trace.span("load_weights", version=update.policy_version):
            # Streamed bucket by bucket into the engine's worker: no copy of the model here.
            self.engine.receive_weights(update)
        self.weight_sync_s = time.perf_counter() - start
        first = self.policy_version is None
        self.policy_version = update.policy_version
        if first:
            resume = self.resume or ResumePoint(policy_version=update.policy_version,
                                                run_start_version=update.policy_version,
                                                first_batch=update.policy_version)
            self.next_group = resume.first_batch * self.groups_per_step
            self.prompts = self.task.train_prompts(self.index, self.cfg.cluster.actors, start=self.next_group)
            self.eval_due = eval_versions(self.cfg, resume.run_start_version) - set(resume.evaluated)
        if self.policy_version in self.eval_due and self.policy_version not in self.evaluated:
            self._admit_eval(self.policy_version)
        logger.debug("actor %d: now at policy version %d (%.3fs)", self.index, self.policy_version, self.weight_sync_s)
        self._send_stats(force=True)

    # ---- results -----------------------------------------------------------------------------
    def _finish(self, completion) -> None:
        request = self.inflight.pop(completion.request_id)
        ids = completion.token_ids
        finish_reason = completion.finish_reason
        if request.reference is not None:  # scored, not generated: the teacher's ending counts
            finish_reason = request.reference.finish_reason
        else:
            self.tokens_generated += int(ids.shape[0])
        text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
        versions = completion.token_policy_versions
        rollout = Rollout(
            rollout_id=completion.request_id, kind=request.kind, batch_index=request.batch_index,
            group_id=request.group_id, actor_index=self.index,
            prompt_ids=np.asarray(request.prompt_ids, dtype=np.int32), response_ids=ids,
            behaviour_logprobs=completion.logprobs, token_policy_versions=versions,
            policy_version=int(versions.min()) if versions.size else self.policy_version,
            reward=float(self.task.reward(request.prompt, text)), finish_reason=finish_reason,
            student_topk_ids=completion.topk_ids,  # None for greedy samples and when top-k is off
            slot_id=request.slot_id,
        )
        self.teachers.send(rollout, replace(request, slot_id=rollout.slot))

    def _resample(self, requests: list[_Request]) -> None:
        """Sample again the slots of rollouts no teacher scored (teacher.on_failure=drop):
        a new request id and seed (``resample`` + 1), the same slot."""
        for request in requests:
            self._submit(replace(request, resample=request.resample + 1))

    def _check_first_weights(self) -> None:
        timeout_s = self.cfg.cluster.startup_timeout_s
        if time.monotonic() - self.waiting_since > timeout_s:
            raise TimeoutError(
                f"actor {self.index}: no weights from the learner within cluster.startup_timeout_s={timeout_s:g}s "
                "after start-up. The learner is stuck or gone (see its log), or loading its checkpoint is slow: "
                "raise cluster.startup_timeout_s.")

    def _send_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_stats < _STATS_EVERY_S:
            return
        self.last_stats = now
        self.stats_out.send(ActorStats(
            actor_index=self.index, policy_version=self.policy_version or 0, tokens_generated=self.tokens_generated,
            engine_busy_s=self.engine_busy_s, wall_s=now - self.started, weight_sync_s=self.weight_sync_s,
            num_retries=self.num_retries, num_unscored=self.num_unscored,
            num_rejected_messages=self.inbox.num_rejected + self.teachers.num_rejected_messages,
            num_unacked=len(self.teachers.unacked), silent_teachers=self.teachers.pool.silent(),
            teacher_pool=self.teachers.pool.describe(),
            num_teacher_failovers=self.teachers.pool.num_marked_unhealthy,
            num_teacher_rejoins=self.teachers.pool.num_rejoined,
        ))

    # ---- the loop ----------------------------------------------------------------------------
    def _handle_messages(self, wait_s: float) -> bool:
        """Read control messages and acks; False when told to shut down."""
        for channel in poll([self.inbox, *self.dealers], wait_s):
            while (received := channel.recv(timeout_s=0.0)) is not None:
                message = received[1]
                if channel is not self.inbox:
                    self._resample(self.teachers.handle(self.dealers.index(channel), message))
                elif isinstance(message, WeightUpdate):
                    self.pending_updates.append(message)
                elif isinstance(message, Shutdown):
                    logger.info("actor %d: shutdown (%s)", self.index, message.reason)
                    return False
                else:
                    channel.num_rejected += 1
        return True

    def run_once(self, idle_wait_s: float = 0.05) -> bool:
        """One turn: messages, weights, admission, one engine step. False on shutdown."""
        if self.policy_version is None and not self.pending_updates:
            self._check_first_weights()
        idle = self.engine.num_unfinished == 0 and not self._may_admit() and not self.pending_updates
        if not self._handle_messages(idle_wait_s if idle else 0.0):
            return False
        while self.pending_updates and self._may_apply_update(self.pending_updates[0]):
            self._apply_update(self.pending_updates.popleft())
        self._admit_groups()
        self.teachers.policy_version = self.policy_version or 0
        self._resample(self.teachers.tick())
        if self.engine.num_unfinished:
            start = time.perf_counter()
            with trace.span("generate", running=self.engine.num_unfinished):
                completions = self.engine.step(self.policy_version)
            self.engine_busy_s += time.perf_counter() - start
            if completions:
                with trace.span("ship", rollouts=len(completions)):
                    for completion in completions:
                        self._finish(completion)
                    self.teachers.flush()  # one RolloutBatch per teacher for this engine step
        self._send_stats()
        return True


def run_actor(cfg: JobConfig, index: int, rendezvous: Rendezvous, student_path: str, *,
              placement: Placement | None = None) -> None:
    """The actor role's main: engine, sockets, weight group, then the loop.
    ``placement``: the job's device plan (None: CPU, weights over gloo)."""
    from transformers import AutoTokenizer

    from asyncopd.actor.engine import VllmEngine
    from asyncopd.tasks import load_task

    tokenizer = AutoTokenizer.from_pretrained(student_path)
    seeds = job_seeds(cfg)
    task = load_task(cfg.task, tokenizer=tokenizer,
                     max_prompt_tokens=cfg.actor.max_model_len - cfg.actor.max_new_tokens,
                     replicate=seeds.prompt_order)
    me = None if placement is None else placement.for_rank(cfg.cluster.learners + index)
    engine = VllmEngine(student_path, cfg.actor, dtype=cfg.model.student.dtype, seed=seeds.actor + index,
                        top_k=cfg.teacher.top_k, placement=me)
    inbox = Channel(zmq.PULL, bind_host=cfg.cluster.host)
    rendezvous.publish(f"actor/{index}/inbox", inbox.address)
    teachers = [rendezvous.lookup(f"teacher/{j}/router") for j in range(cfg.cluster.teachers)]
    if cfg.teacher.backend == "colocated":  # no teacher ranks: learner rank 0 takes the rollouts
        teachers = [rendezvous.lookup("learner/rollouts")]
    # One DEALER per teacher, so that the pool client chooses where each rollout goes.
    dealers = [Channel(zmq.DEALER, connect=[t], identity=f"actor-{index}".encode()) for t in teachers]
    stats_out = Channel(zmq.PUSH, connect=[rendezvous.lookup("learner/inbox")])
    tp = 1 if me is None else me.tensor_parallel_size  # the placement decides (1 on the CPU)
    host, port = store_address(rendezvous.store)
    engine.join_weight_group(host, port, rendezvous.lookup("weights/group_prefix"), 1 + index * tp,
                             1 + cfg.cluster.actors * tp, cfg.learner.weight_sync_timeout_s,
                             "gloo" if placement is None else placement.weight_carrier)
    rendezvous.barrier("connected")
    references = None
    if cfg.eval.enabled:  # the rank holding the teacher published them before the barrier
        references = read_teacher_references(rendezvous).references
    resume = msgspec.json.decode(rendezvous.lookup("resume"), type=ResumePoint)
    loop = ActorLoop(cfg, index, engine=engine, task=task, tokenizer=tokenizer, inbox=inbox, dealer=dealers,
                     stats_out=stats_out, references=references, resume=resume)
    try:
        # The Shutdown message, or the store's flag should that message be lost.
        ended = ShutdownWatch(rendezvous)
        while loop.run_once() and not ended():
            pass
    finally:
        for channel in (inbox, *dealers, stats_out):
            channel.close()
        engine.shutdown()
