"""One learner rank of tests/distributed/test_learner_device.py.

Run as ``python _device_worker.py RANK WORLD_SIZE INIT_FILE MODEL_DIR OUT_DIR``. On 2
gloo CPU ranks: build the student with asyncopd.learner.device.build_student (meta
init, rank-0 load, broadcast), record its full weights and buffers, then train 8
steps in float32, in float32 with activation checkpointing, and in bfloat16
(FSDP2 MixedPrecisionPolicy), writing the losses to OUT_DIR/rank<R>.pt.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

NUM_STEPS = 8


def _fsdp_worker():
    spec = importlib.util.spec_from_file_location("_fsdp_worker", Path(__file__).with_name("_fsdp_worker.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(rank: int, world_size: int, init_file: str, model_dir: Path, out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from asyncopd.learner.device import build_student
    from asyncopd.learner.model import iter_full_weights
    from asyncopd.learner.train import make_optimizer, train_step

    shared = _fsdp_worker()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    samples = shared.synthetic_samples()
    cpu = torch.device("cpu")
    result: dict = {}
    model = build_student(model_dir, cpu, torch.float32)
    result["weights"] = dict(iter_full_weights(model))
    result["buffers"] = {name: b.clone() for name, b in model.named_buffers()}
    for name, dtype, checkpointing in (("fp32", torch.float32, False), ("fp32_ckpt", torch.float32, True),
                                       ("bf16", torch.bfloat16, False)):
        torch.manual_seed(0)
        model = build_student(model_dir, cpu, dtype, activation_checkpointing=checkpointing)
        optimizer = make_optimizer(model, shared.LEARNER_CFG)
        result[name] = [train_step(model, optimizer, samples, shared.LOSS_CFG, shared.LEARNER_CFG, rank=rank,
                                   dp_size=world_size)["learner/loss"] for _ in range(NUM_STEPS)]
        result[f"{name}_master_dtype"] = next(model.parameters()).dtype
        result[f"{name}_fsdp"] = isinstance(model, FSDPModule)
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _fsdp_worker().run_rank(main)
