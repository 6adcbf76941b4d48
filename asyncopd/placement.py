"""Device placement: which device (and which GPUs, how much of them) every rank gets.

The launcher calls :func:`plan_placement` in every rank *before* torch or vLLM is
imported, sets ``CUDA_VISIBLE_DEVICES`` from the rank's :class:`RankPlacement`
(so each process sees exactly its own GPUs, as ``cuda:0..k-1``) and hands the
placement to the role. Roles receive a device; they never choose one.

Inputs: the role counts and per-role GPU counts (``cluster.*``), the per-role
memory fractions (``actor/teacher/learner.gpu_memory_utilization``), torchrun's
layout (processes per node, number of nodes) and the GPUs visible on a node
(:func:`parse_visible_gpus`, from ``CUDA_VISIBLE_DEVICES`` and ``nvidia-smi``).
Nodes are assumed alike (torchrun starts the same number of processes on each;
the same GPUs are visible on each), so every rank can plan the whole world and
all agree on the weight carrier.

Two layouts, tried in this order on each node:

- **exclusive**: every rank gets GPUs of its own, in rank order (a learner rank
  one, an actor ``cluster.gpus_per_actor``, a teacher ``cluster.gpus_per_teacher``);
- **shared**: more ranks than GPUs; every rank gets one GPU, round-robin, and the
  ranks on one GPU split its memory by fractions (explicit ones first, the rest of
  :data:`SHARED_BUDGET` in equal parts). Tensor-parallel roles cannot share.

The weight carrier follows (``gloo`` on CPU; ``nccl`` when learner rank 0 shares
no GPU with an actor; ``cuda_ipc`` when every actor sits on learner rank 0's GPU):
NCCL refuses two ranks on one GPU, and CUDA IPC only reaches the same node.

Impossible layouts raise :class:`~asyncopd.config.ConfigError` naming the field
and the fix. With model sizes (:func:`estimate_num_params`) the plan also checks
that each role's share of its GPU can hold what it must (weights, optimiser).

It is also the device seam of the roles: what differs between a CPU and a GPU rank
is decided here (:func:`rank_device`, :func:`vllm_device_args`,
:func:`limit_gpu_memory`), so the roles branch on no device string themselves.

This module imports neither torch nor vLLM at import time (only
:func:`limit_gpu_memory`, which a role calls, imports torch) and does not touch
``os.environ``.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from asyncopd.config import ConfigError, JobConfig

__all__ = [
    "GpuInfo",
    "ModelSizes",
    "RankPlacement",
    "Placement",
    "SHARED_BUDGET",
    "EXCLUSIVE_ENGINE_FRACTION",
    "parse_visible_gpus",
    "query_nvidia_smi",
    "estimate_num_params",
    "plan_placement",
    "rank_device",
    "vllm_device_args",
    "limit_gpu_memory",
]

logger = logging.getLogger(__name__)

SHARED_BUDGET = 0.9
"""Fraction of a shared GPU handed out to the ranks on it (the rest: CUDA contexts,
NCCL/cuBLAS workspaces, fragmentation)."""
EXCLUSIVE_ENGINE_FRACTION = 0.9
"""vLLM's gpu_memory_utilization for an engine alone on its GPUs (vLLM's own default)."""
_HEADROOM_BYTES = 1 << 30
"""Memory a role needs besides its weights (activations, a minimal KV cache), per rank."""
_GIB = float(1 << 30)

Role = Literal["learner", "actor", "teacher"]
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU visible on a node."""

    id: str
    """Its CUDA_VISIBLE_DEVICES entry (an index or a UUID), as the node names it."""
    memory_bytes: int | None = None
    """Total memory; None when unknown (the memory checks are then skipped)."""


@dataclass(frozen=True, slots=True)
class ModelSizes:
    """Parameter counts of the models, for the memory checks (see estimate_num_params)."""

    student_params: int
    teacher_params: int | None = None
    """None when the teacher is not held by a teacher rank (teacher.backend=vllm_http)."""


@dataclass(frozen=True, slots=True)
class RankPlacement:
    """Where one rank runs."""

    rank: int
    role: Role
    index: int
    """Index within the role."""
    node: int
    """torchrun node (GROUP_RANK) the rank runs on."""
    device_type: Literal["cpu", "cuda"]
    gpus: tuple[str, ...] = ()
    """The node's GPU ids this rank owns (empty on CPU); it sees them as cuda:0.."""
    memory_fraction: float | None = None
    """Fraction of each of its GPUs it may use (vLLM gpu_memory_utilization for engines,
    the caching-allocator cap for torch roles); None: no cap (CPU, or a learner alone)."""
    shared: bool = False
    """Another rank uses one of these GPUs."""

    @property
    def device(self) -> str:
        """The torch device of this rank's (first) GPU inside its process, or "cpu"."""
        return "cuda:0" if self.on_gpu else "cpu"

    @property
    def on_gpu(self) -> bool:
        return self.device_type == "cuda"

    @property
    def tensor_parallel_size(self) -> int:
        return max(len(self.gpus), 1)

    def environment(self) -> dict[str, str]:
        """What the launcher sets before importing torch: the GPUs this process may see."""
        if not self.on_gpu:
            return {}
        return {"CUDA_VISIBLE_DEVICES": ",".join(self.gpus)}


@dataclass(frozen=True, slots=True)
class Placement:
    """Every rank's placement, and how weights travel from learner rank 0 to the actors."""

    ranks: tuple[RankPlacement, ...]
    weight_carrier: Literal["gloo", "nccl", "cuda_ipc"]
    layout: Literal["cpu", "exclusive", "shared"]

    def for_rank(self, rank: int) -> RankPlacement:
        return self.ranks[rank]

    def describe(self) -> str:
        """One line per rank, for the start-up log."""
        lines = [f"placement: {self.layout}, weights over {self.weight_carrier}"]
        for p in self.ranks:
            where = "cpu" if p.device_type == "cpu" else f"gpu {','.join(p.gpus)}"
            share = "" if p.memory_fraction is None else f" ({p.memory_fraction:.2f} of memory)"
            lines.append(f"  rank {p.rank}: {p.role} {p.index} on {where}{share}")
        return "\n".join(lines)


def parse_visible_gpus(cuda_visible_devices: str | None, nvidia_smi_csv: str | None) -> list[GpuInfo]:
    """The GPUs this node offers.

    ``nvidia_smi_csv``: the output of ``nvidia-smi --query-gpu=index,uuid,memory.total
    --format=csv,noheader,nounits`` (memory in MiB), None when nvidia-smi is missing.
    ``cuda_visible_devices``: the inherited variable; when set it selects (and orders)
    GPUs by index or UUID, and an empty value or "-1" hides them all.
    """
    rows: list[tuple[str, str, int | None]] = []
    for line in (nvidia_smi_csv or "").strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        memory = int(float(parts[2]) * 2**20) if parts[2].replace(".", "", 1).isdigit() else None
        rows.append((parts[0], parts[1], memory))
    if cuda_visible_devices is None:
        return [GpuInfo(index, memory) for index, _, memory in rows]
    wanted = [entry.strip() for entry in cuda_visible_devices.split(",") if entry.strip()]
    if not wanted or wanted[0] == "-1":
        return []
    gpus = []
    for entry in wanted:
        match = next((r for r in rows if entry in (r[0], r[1]) or (entry.startswith("GPU-") and r[1].startswith(entry))),
                     None)
        gpus.append(GpuInfo(entry, None if match is None else match[2]))
    return gpus


def query_nvidia_smi(timeout_s: float = 20.0) -> str | None:
    """``nvidia-smi``'s GPU list as parse_visible_gpus reads it; None without nvidia-smi."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,uuid,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def estimate_num_params(model_dir: str | Path) -> int | None:
    """Parameters of a decoder-only HF model from its config.json alone (embeddings,
    attention with grouped KV heads, gated MLP or experts, norms); None when the file is
    missing or not of that shape. An estimate, for start-up memory checks only."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    try:
        hidden, layers, vocab = int(config["hidden_size"]), int(config["num_hidden_layers"]), int(config["vocab_size"])
        heads = int(config["num_attention_heads"])
        inter = int(config.get("intermediate_size") or 4 * hidden)
    except (KeyError, TypeError, ValueError):
        return None
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    experts = int(config.get("num_experts") or config.get("num_local_experts") or 1)
    expert_inter = int(config.get("moe_intermediate_size") or inter)
    mlp = 3 * hidden * expert_inter * experts + (hidden * experts if experts > 1 else 0)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings", False) else 2)
    return embeddings + layers * (attention + mlp + 2 * hidden) + hidden


def _gpus_of(cfg: JobConfig, role: Role) -> int:
    if role == "teacher" and cfg.teacher.backend == "vllm_http":
        return 0  # a client of a server elsewhere: the CPU is enough
    return {"learner": 1, "actor": cfg.cluster.gpus_per_actor, "teacher": cfg.cluster.gpus_per_teacher}[role]


def _fraction_field(role: Role) -> str:
    return f"{role}.gpu_memory_utilization"


def _explicit_fraction(cfg: JobConfig, role: Role) -> float | None:
    return {"learner": cfg.learner.gpu_memory_utilization, "actor": cfg.actor.gpu_memory_utilization,
            "teacher": cfg.teacher.gpu_memory_utilization}[role]


def plan_placement(cfg: JobConfig, *, procs_per_node: int, num_nodes: int, gpus: list[GpuInfo],
                   sizes: ModelSizes | None = None) -> Placement:
    """Plan every rank of the world (see the module docstring). ``gpus``: those of one
    node (all nodes alike). Raises ConfigError for a layout that cannot run."""
    cluster = cfg.cluster
    world = cluster.world_size
    if procs_per_node * num_nodes != world:
        raise ConfigError(
            f"torchrun runs {num_nodes} node(s) x {procs_per_node} processes = {procs_per_node * num_nodes} ranks, "
            f"but cluster.learners+actors+teachers={world}. Fix: start torchrun with --nproc-per-node="
            f"{world // max(num_nodes, 1)} on each node (the sum must split evenly over nodes).")
    roles = [cluster.role_of(rank) for rank in range(world)]
    if cluster.device == "cpu" or (cluster.device == "auto" and not gpus):
        return Placement(tuple(RankPlacement(rank, role, index, rank // procs_per_node, "cpu")
                               for rank, (role, index) in enumerate(roles)),
                         weight_carrier="gloo", layout="cpu")
    if not gpus:
        raise ConfigError("cluster.device='cuda': no GPU is visible on this node (CUDA_VISIBLE_DEVICES / "
                          "nvidia-smi). Fix: run on a GPU node, or set cluster.device=cpu (or auto).")
    if cfg.teacher.backend == "hf" and cluster.gpus_per_teacher > 1:
        raise ConfigError(f"cluster.gpus_per_teacher={cluster.gpus_per_teacher}: the hf teacher backend runs on one "
                          "GPU. Fix: set cluster.gpus_per_teacher=1, or teacher.backend=vllm for a tensor-parallel "
                          "teacher.")
    nodes = [list(range(node * procs_per_node, (node + 1) * procs_per_node)) for node in range(num_nodes)]
    needed = [sum(_gpus_of(cfg, roles[rank][0]) for rank in node) for node in nodes]
    if all(n <= len(gpus) for n in needed):
        placements = [_exclusive(cfg, roles, node, gpus) for node in nodes]
        layout = "exclusive"
    else:
        placements = [_shared(cfg, roles, node, gpus, needed[i]) for i, node in enumerate(nodes)]
        layout = "shared"
    ranks = tuple(p for node in placements for p in node)
    if sizes is not None:
        _check_memory(cfg, ranks, {g.id: g.memory_bytes for g in gpus}, sizes)
    return Placement(ranks, weight_carrier=_carrier(cfg, ranks), layout=layout)


def _exclusive(cfg: JobConfig, roles: list[tuple[Role, int]], node: list[int], gpus: list[GpuInfo]) -> list[RankPlacement]:
    out, cursor = [], 0
    for rank in node:
        role, index = roles[rank]
        count = _gpus_of(cfg, role)
        if count == 0:
            out.append(RankPlacement(rank, role, index, rank // len(node), "cpu"))
            continue
        owned = tuple(g.id for g in gpus[cursor:cursor + count])
        cursor += count
        fraction = _explicit_fraction(cfg, role)
        if fraction is None and role != "learner":
            fraction = EXCLUSIVE_ENGINE_FRACTION
        out.append(RankPlacement(rank, role, index, rank // len(node), "cuda", owned, fraction, shared=False))
    return out


def _shared(cfg: JobConfig, roles: list[tuple[Role, int]], node: list[int], gpus: list[GpuInfo],
            needed: int) -> list[RankPlacement]:
    cluster = cfg.cluster
    for role, field, count in (("actor", "cluster.gpus_per_actor", cluster.gpus_per_actor),
                               ("teacher", "cluster.gpus_per_teacher", cluster.gpus_per_teacher)):
        if count > 1 and any(roles[r][0] == role for r in node):
            raise ConfigError(
                f"{field}={count}: this node's ranks need {needed} GPUs of their own but only {len(gpus)} are "
                f"visible, and tensor-parallel {role}s cannot share GPUs with other roles. Fix: make {needed} GPUs "
                f"visible per node, lower {field}, or use fewer ranks per node (cluster.actors/teachers/learners).")
    on_gpu = [rank for rank in node if _gpus_of(cfg, roles[rank][0]) > 0]
    assigned: dict[str, list[int]] = {g.id: [] for g in gpus}
    for position, rank in enumerate(on_gpu):
        assigned[gpus[position % len(gpus)].id].append(rank)
    fractions: dict[int, float] = {}
    for gpu, ranks in assigned.items():
        explicit = {r: _explicit_fraction(cfg, roles[r][0]) for r in ranks}
        given = sum(f for f in explicit.values() if f is not None)
        unset = [r for r, f in explicit.items() if f is None]
        who = ", ".join(f"{roles[r][0]} {roles[r][1]}" for r in ranks)
        if given > 1.0 + 1e-9 or (unset and given >= SHARED_BUDGET):
            fields = sorted({_fraction_field(roles[r][0]) for r in ranks if explicit[r] is not None})
            raise ConfigError(
                f"{', '.join(fields)}: the ranks sharing GPU {gpu} ({who}) are given {given:.2f} of its memory"
                + (f", leaving nothing for {len(unset)} more" if unset else "")
                + f". Fix: lower those fractions so that they sum to at most {SHARED_BUDGET} on one GPU, or make "
                "more GPUs visible so that fewer ranks share one.")
        share = (SHARED_BUDGET - given) / len(unset) if unset else 0.0
        if unset and share < 0.05:
            raise ConfigError(
                f"{len(ranks)} ranks share GPU {gpu} ({who}): {share:.3f} of its memory each is too little. Fix: make "
                "more GPUs visible, use fewer ranks per node, or set the roles' gpu_memory_utilization explicitly.")
        for r in ranks:
            fractions[r] = explicit[r] if explicit[r] is not None else share
    out = []
    for rank in node:
        role, index = roles[rank]
        if rank not in on_gpu:
            out.append(RankPlacement(rank, role, index, rank // len(node), "cpu"))
            continue
        gpu = gpus[on_gpu.index(rank) % len(gpus)].id
        out.append(RankPlacement(rank, role, index, rank // len(node), "cuda", (gpu,), round(fractions[rank], 4),
                                 shared=len(assigned[gpu]) > 1))
    return out


def _carrier(cfg: JobConfig, ranks: tuple[RankPlacement, ...]) -> Literal["nccl", "cuda_ipc"]:
    learner0 = ranks[0]
    actors = [p for p in ranks if p.role == "actor"]
    on_learner_gpu = [p for p in actors if p.node == learner0.node and set(p.gpus) & set(learner0.gpus)]
    if not on_learner_gpu:
        return "nccl"
    if len(on_learner_gpu) == len(actors):
        return "cuda_ipc"
    inside = ", ".join(str(p.index) for p in on_learner_gpu)
    raise ConfigError(
        f"cluster.actors={cfg.cluster.actors}: actor(s) {inside} share learner rank 0's GPU and the others do not; "
        "weights reach an actor on the learner's GPU by CUDA IPC and the others by NCCL, which cannot join two ranks "
        "on one GPU, and one update uses one carrier. Fix: make enough GPUs visible for every rank to have its own "
        "(an exclusive layout), or run every role on one GPU.")


def _check_memory(cfg: JobConfig, ranks: tuple[RankPlacement, ...], memory: dict[str, int | None],
                  sizes: ModelSizes) -> None:
    for p in ranks:
        totals = [memory.get(g) for g in p.gpus]
        if not totals or any(t is None for t in totals):
            continue
        total = min(t for t in totals if t is not None)
        fraction = p.memory_fraction if p.memory_fraction is not None else 1.0
        budget = fraction * total
        need, what = _need(cfg, p, sizes)
        if need is None or need <= budget:
            continue
        field = _fraction_field(p.role)
        raise ConfigError(
            f"{field}={_explicit_fraction(cfg, p.role)}: {p.role} {p.index} gets {fraction:.2f} = {budget / _GIB:.1f} GiB of GPU "
            f"{','.join(p.gpus)} ({total / _GIB:.0f} GiB{', shared' if p.shared else ''}), but needs about "
            f"{need / _GIB:.1f} GiB ({what}). Fix: give it a larger share ({field}, lowering the other roles on that "
            "GPU), a GPU of its own (more visible GPUs, fewer ranks per node), more GPUs "
            "(cluster.gpus_per_actor / cluster.gpus_per_teacher / cluster.learners), or a smaller model or dtype.")


def _need(cfg: JobConfig, p: RankPlacement, sizes: ModelSizes) -> tuple[int | None, str]:
    tp = p.tensor_parallel_size
    if p.role == "learner":
        per_param = 16  # fp32 master + fp32 grad + two fp32 AdamW moments, sharded over the learners
        need = sizes.student_params * per_param // cfg.cluster.learners + _HEADROOM_BYTES
        return need, (f"{sizes.student_params / 1e9:.2f} B student params x {per_param} bytes "
                      f"/ {cfg.cluster.learners} learner ranks + 1 GiB")
    if p.role == "actor":
        weights = sizes.student_params * _DTYPE_BYTES[cfg.model.student.dtype] // tp
        return weights + _HEADROOM_BYTES, f"student weights in {cfg.model.student.dtype} / {tp} GPUs + 1 GiB"
    if sizes.teacher_params is None or cfg.teacher.backend == "vllm_http":
        return None, ""
    weights = sizes.teacher_params * _DTYPE_BYTES[cfg.model.teacher.dtype] // tp
    return weights + _HEADROOM_BYTES, f"teacher weights in {cfg.model.teacher.dtype} / {tp} GPUs + 1 GiB"


# -- the device seam of the roles ----------------------------------------------------


def rank_device(me: RankPlacement | None) -> str:
    """The torch device of a rank; "cpu" without a placement."""
    return "cpu" if me is None else me.device


def vllm_device_args(me: RankPlacement | None, *, kv_cache_gib: float) -> dict[str, Any]:
    """The vLLM ``EngineArgs`` that depend on the device. On GPU: tensor parallelism
    over the rank's GPUs and the KV cache sized by its memory share; on the CPU an
    explicit KV size (vLLM's CPU worker otherwise sizes it from the NUMA node's memory
    and refuses to start on machines that under-report it)."""
    if me is not None and me.on_gpu:
        return {"tensor_parallel_size": me.tensor_parallel_size,
                "gpu_memory_utilization": me.memory_fraction or EXCLUSIVE_ENGINE_FRACTION}
    return {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}


def limit_gpu_memory(device: str, fraction: float | None, *, role: str) -> None:
    """Cap this process's CUDA caching allocator on ``device`` (a GPU shared with
    other ranks) at ``fraction`` of its memory; nothing on the CPU or without a fraction."""
    if not device.startswith("cuda") or fraction is None:
        return
    import torch

    torch.cuda.set_per_process_memory_fraction(fraction, torch.device(device))
    logger.info("%s memory capped at %.2f of %s", role, fraction, torch.cuda.get_device_name(torch.device(device)))
