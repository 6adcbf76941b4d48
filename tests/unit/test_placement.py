"""Placement plans for many layouts (no GPU needed: the node's GPUs are given)."""

import json
import sys

import pytest

from asyncopd.config import ConfigError, JobConfig, from_dict
from asyncopd.placement import (GpuInfo, ModelSizes, estimate_num_params, limit_gpu_memory, parse_visible_gpus,
                                plan_placement, rank_device, vllm_device_args)

GIB = 1 << 30


def _cfg(**groups) -> JobConfig:
    return from_dict({k: v for k, v in groups.items()})


def _gpus(n: int, gib: int = 80) -> list[GpuInfo]:
    return [GpuInfo(str(i), gib * GIB) for i in range(n)]


def test_cpu_machine_keeps_todays_behaviour() -> None:
    cfg = _cfg(cluster={"learners": 2, "actors": 1, "teachers": 1})
    plan = plan_placement(cfg, procs_per_node=4, num_nodes=1, gpus=[])
    assert plan.layout == "cpu" and plan.weight_carrier == "gloo"
    assert [p.device for p in plan.ranks] == ["cpu"] * 4
    assert all(p.environment() == {} for p in plan.ranks)


def test_device_cpu_ignores_gpus() -> None:
    plan = plan_placement(_cfg(cluster={"device": "cpu"}), procs_per_node=3, num_nodes=1, gpus=_gpus(8))
    assert plan.layout == "cpu"


def test_device_cuda_without_gpu_fails() -> None:
    with pytest.raises(ConfigError, match="cluster.device='cuda': no GPU is visible"):
        plan_placement(_cfg(cluster={"device": "cuda"}), procs_per_node=3, num_nodes=1, gpus=[])


def test_one_gpu_shared_by_all_roles() -> None:
    cfg = _cfg(actor={"gpu_memory_utilization": 0.3})
    plan = plan_placement(cfg, procs_per_node=3, num_nodes=1, gpus=_gpus(1))
    assert plan.layout == "shared" and plan.weight_carrier == "cuda_ipc"
    assert [p.gpus for p in plan.ranks] == [("0",)] * 3
    assert all(p.shared for p in plan.ranks)
    learner, actor, teacher = plan.ranks
    assert actor.memory_fraction == 0.3
    assert learner.memory_fraction == pytest.approx(0.3) and teacher.memory_fraction == pytest.approx(0.3)
    assert actor.environment() == {"CUDA_VISIBLE_DEVICES": "0"} and actor.device == "cuda:0"


def test_eight_gpus_exclusive_with_tensor_parallel_actors() -> None:
    cfg = _cfg(cluster={"learners": 2, "actors": 2, "teachers": 2, "gpus_per_actor": 2},
               learner={"batch_size": 8})
    plan = plan_placement(cfg, procs_per_node=6, num_nodes=1, gpus=_gpus(8))
    assert plan.layout == "exclusive" and plan.weight_carrier == "nccl"
    assert [p.gpus for p in plan.ranks] == [("0",), ("1",), ("2", "3"), ("4", "5"), ("6",), ("7",)]
    assert [p.tensor_parallel_size for p in plan.ranks] == [1, 1, 2, 2, 1, 1]
    assert plan.ranks[2].environment() == {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert plan.ranks[0].memory_fraction is None  # a learner alone on its GPU is not capped
    assert plan.ranks[2].memory_fraction == 0.9 and not any(p.shared for p in plan.ranks)


def test_two_nodes_gpu_ids_restart_per_node() -> None:
    cfg = _cfg(cluster={"learners": 4, "actors": 8, "teachers": 4}, learner={"batch_size": 64})
    plan = plan_placement(cfg, procs_per_node=8, num_nodes=2, gpus=_gpus(8))
    assert plan.layout == "exclusive" and plan.weight_carrier == "nccl"
    assert [p.node for p in plan.ranks] == [0] * 8 + [1] * 8
    assert [p.gpus[0] for p in plan.ranks] == [str(i) for i in range(8)] * 2
    assert plan.for_rank(12) == plan.ranks[12] and plan.ranks[12].role == "teacher"
    assert [(p.role, p.index) for p in plan.ranks[8:10]] == [("actor", 4), ("actor", 5)]


def test_more_gpus_than_needed_leaves_the_rest_idle() -> None:
    plan = plan_placement(_cfg(), procs_per_node=3, num_nodes=1, gpus=_gpus(4))
    assert [p.gpus for p in plan.ranks] == [("0",), ("1",), ("2",)]


def test_two_gpus_shared_round_robin_mixed_carriers_fail() -> None:
    # learner on 0, actor 0 on 1, actor 1 on 0 with the learner: one carrier cannot serve both.
    cfg = _cfg(cluster={"actors": 2, "teachers": 1}, learner={"batch_size": 8})
    with pytest.raises(ConfigError, match=r"actor\(s\) 1 share learner rank 0's GPU and the others do not"):
        plan_placement(cfg, procs_per_node=4, num_nodes=1, gpus=_gpus(2))


def test_two_gpus_shared_learner_alone_with_teacher() -> None:
    cfg = _cfg(cluster={"actors": 1, "teachers": 2})
    plan = plan_placement(cfg, procs_per_node=4, num_nodes=1, gpus=_gpus(2))
    # learner 0 + teacher 0 on GPU 0, actor + teacher 1 on GPU 1: NCCL between GPUs.
    assert [p.gpus[0] for p in plan.ranks] == ["0", "1", "0", "1"]
    assert plan.weight_carrier == "nccl"
    assert [p.memory_fraction for p in plan.ranks] == [0.45] * 4


def test_tensor_parallel_actor_cannot_share() -> None:
    cfg = _cfg(cluster={"gpus_per_actor": 2})
    with pytest.raises(ConfigError, match=r"cluster.gpus_per_actor=2: this node's ranks need 4 GPUs of their own "
                                          r"but only 2 are visible"):
        plan_placement(cfg, procs_per_node=3, num_nodes=1, gpus=_gpus(2))


def test_fractions_over_budget_name_the_fields() -> None:
    cfg = _cfg(actor={"gpu_memory_utilization": 0.6}, teacher={"gpu_memory_utilization": 0.5})
    with pytest.raises(ConfigError, match=r"actor.gpu_memory_utilization, teacher.gpu_memory_utilization: the ranks "
                                          r"sharing GPU 0 \(learner 0, actor 0, teacher 0\) are given 1.10"):
        plan_placement(cfg, procs_per_node=3, num_nodes=1, gpus=_gpus(1))


def test_too_many_ranks_on_one_gpu() -> None:
    cfg = _cfg(cluster={"actors": 16, "teachers": 16}, learner={"batch_size": 64})
    with pytest.raises(ConfigError, match=r"33 ranks share GPU 0 .*too little"):
        plan_placement(cfg, procs_per_node=33, num_nodes=1, gpus=_gpus(1))


def test_teacher_that_cannot_fit_beside_an_engine() -> None:
    # A 7B bf16 teacher (~14 GiB) on a shared 24 GiB GPU with a third of it: refused, naming the field.
    cfg = _cfg(model={"teacher": {"dtype": "bfloat16"}})
    sizes = ModelSizes(student_params=100_000_000, teacher_params=7_000_000_000)
    with pytest.raises(ConfigError, match=r"teacher.gpu_memory_utilization=None: teacher 0 gets 0.30 = 7.2 GiB of GPU 0 "
                                          r"\(24 GiB, shared\), but needs about 14.0 GiB"):
        plan_placement(cfg, procs_per_node=3, num_nodes=1, gpus=_gpus(1, gib=24), sizes=sizes)
    # On an 80 GiB GPU it fits.
    plan_placement(cfg, procs_per_node=3, num_nodes=1, gpus=_gpus(1, gib=80), sizes=sizes)


def test_learner_memory_counts_optimizer_state_sharded() -> None:
    cfg = _cfg(cluster={"learners": 1, "actors": 1, "teachers": 1})
    sizes = ModelSizes(student_params=7_000_000_000, teacher_params=1_000_000)
    with pytest.raises(ConfigError, match=r"learner.gpu_memory_utilization=None: learner 0 gets 1.00 = 80.0 GiB .* needs "
                                          r"about 105.3 GiB"):
        plan_placement(cfg, procs_per_node=3, num_nodes=1, gpus=_gpus(3), sizes=sizes)


def test_hf_teacher_is_single_gpu() -> None:
    with pytest.raises(ConfigError, match="cluster.gpus_per_teacher=2: the hf teacher backend runs on one GPU"):
        plan_placement(_cfg(cluster={"gpus_per_teacher": 2}), procs_per_node=3, num_nodes=1, gpus=_gpus(4))


def test_world_must_split_over_nodes() -> None:
    with pytest.raises(ConfigError, match="--nproc-per-node"):
        plan_placement(_cfg(), procs_per_node=2, num_nodes=2, gpus=_gpus(2))


def test_fraction_field_validation() -> None:
    with pytest.raises(ConfigError, match=r"actor.gpu_memory_utilization=1.5: is a fraction"):
        _cfg(actor={"gpu_memory_utilization": 1.5})


SMI = "0, GPU-aaaa-1111, 81559\n1, GPU-bbbb-2222, 81559\n2, GPU-cccc-3333, 81559\n"


def test_parse_visible_gpus() -> None:
    assert [g.id for g in parse_visible_gpus(None, SMI)] == ["0", "1", "2"]
    assert parse_visible_gpus(None, SMI)[0].memory_bytes == 81559 * 2**20
    assert [g.id for g in parse_visible_gpus("2,0", SMI)] == ["2", "0"]
    assert parse_visible_gpus("GPU-bbbb", SMI)[0].memory_bytes == 81559 * 2**20
    assert parse_visible_gpus("", SMI) == [] and parse_visible_gpus("-1", SMI) == []
    assert parse_visible_gpus(None, None) == []
    assert parse_visible_gpus("3", None) == [GpuInfo("3", None)]


def test_estimate_num_params_matches_a_real_model(tmp_path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(tmp_path)
    exact = sum(p.numel() for p in model.parameters())
    # Qwen2 has q/k/v biases the estimate leaves out: within 1%.
    assert abs(estimate_num_params(tmp_path) - exact) / exact < 0.01
    assert estimate_num_params(tmp_path / "missing") is None


def test_device_seam_on_cpu_and_gpu() -> None:
    cpu = plan_placement(_cfg(), procs_per_node=3, num_nodes=1, gpus=[]).ranks[1]
    shared = plan_placement(_cfg(actor={"gpu_memory_utilization": 0.3}), procs_per_node=3, num_nodes=1,
                            gpus=_gpus(1)).ranks[1]
    tp = plan_placement(_cfg(cluster={"learners": 2, "actors": 2, "teachers": 2, "gpus_per_actor": 2},
                             learner={"batch_size": 8}), procs_per_node=6, num_nodes=1, gpus=_gpus(8)).ranks[2]
    assert [rank_device(None), rank_device(cpu), rank_device(shared)] == ["cpu", "cpu", "cuda:0"]
    assert vllm_device_args(None, kv_cache_gib=0.5) == {"kv_cache_memory_bytes": GIB // 2}
    assert vllm_device_args(cpu, kv_cache_gib=0.25) == {"kv_cache_memory_bytes": GIB // 4}
    assert vllm_device_args(shared, kv_cache_gib=0.25) == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.3}
    assert vllm_device_args(tp, kv_cache_gib=0.25) == {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.9}
    limit_gpu_memory("cpu", 0.5, role="learner")  # nothing to cap on the CPU (and no CUDA call)
    limit_gpu_memory("cuda:0", None, role="learner")  # a rank alone on its GPU is not capped


def test_placement_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, asyncopd.placement; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_gpu_settings_compose_with_a_task_config() -> None:
    from asyncopd.launch import compose_config

    cfg = compose_config(["--config-name", "tiny", "+device=gpu"])
    assert (cfg.cluster.device, cfg.model.student.dtype, cfg.actor.enforce_eager) == ("cuda", "bfloat16", False)
    assert cfg.teacher.backend == "vllm" and cfg.learner.num_steps == 4  # the task config's own values stay
    plan = plan_placement(cfg, procs_per_node=3, num_nodes=1, gpus=_gpus(1))
    assert plan.weight_carrier == "cuda_ipc" and [p.memory_fraction for p in plan.ranks] == [0.3] * 3


def test_launcher_plans_from_the_environment(monkeypatch) -> None:
    import asyncopd.launch as launch
    import asyncopd.placement as placement

    monkeypatch.setattr(placement, "query_nvidia_smi", lambda: SMI)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,1,0")
    plan = launch.plan_devices(_cfg(), procs_per_node=3, num_nodes=1)
    assert [p.environment()["CUDA_VISIBLE_DEVICES"] for p in plan.ranks] == ["2", "1", "0"]
    monkeypatch.setattr(placement, "query_nvidia_smi", lambda: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert launch.plan_devices(_cfg(), procs_per_node=3, num_nodes=1).layout == "cpu"


def test_http_teacher_needs_no_gpu() -> None:
    cfg = _cfg(teacher={"backend": "vllm_http", "url": "http://127.0.0.1:8000/v1"})
    plan = plan_placement(cfg, procs_per_node=3, num_nodes=1, gpus=_gpus(2))
    assert [p.device for p in plan.ranks] == ["cuda:0", "cuda:0", "cpu"]
    assert [p.gpus for p in plan.ranks] == [("0",), ("1",), ()] and plan.layout == "exclusive"
