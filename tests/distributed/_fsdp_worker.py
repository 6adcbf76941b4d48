"""One learner rank of the FSDP2 test (tests/distributed/test_fsdp.py).

Run as ``python _fsdp_worker.py RANK WORLD_SIZE INIT_FILE MODEL_DIR OUT_DIR``; the
test starts one process per rank and reads ``OUT_DIR/rank<R>.pt``. The synthetic
batch and the configs live here so that the test's single-process reference
uses exactly the same ones.

What a rank does: shard the tiny model, stream its full weights, run 3
``train_step``s on its half of the batch (checkpointing after step 1), stream
the weights again, export HF, then resume step 2 from the checkpoint into a
fresh model/optimiser, and one step of 2 mini-batches x 2 epochs from the
initial weights.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from asyncopd.config import LearnerConfig, LossConfig
from asyncopd.learner.batching import TrainSample, pack_micro_batches

NUM_STEPS = 3
TOKEN_BUDGET = 40
# Rank 0 gets the long rows (3 micro-batches), rank 1 the short ones (1 micro-batch).
LENGTHS = [(10, 20), (4, 8), (5, 20), (3, 7), (8, 12), (2, 6)]  # (prompt, response)
LOSS_CFG = LossConfig(kl_loss="none", pg_coef=1.0, opd_coef=1.0, importance_correction="tis", tis_cap=1.5)
LEARNER_CFG = LearnerConfig(lr=1e-3, max_grad_norm=0.5, micro_batch_tokens=TOKEN_BUDGET)
MULTI_LEARNER_CFG = LearnerConfig(lr=1e-3, max_grad_norm=0.5, micro_batch_tokens=TOKEN_BUDGET, mini_batches=2,
                                  ppo_epochs=2)
PROBE_IDS = torch.tensor([[5, 17, 33, 60, 2, 9, 41, 77], [3, 3, 50, 12, 90, 8, 1, 0]])  # [2, 8]


def synthetic_samples(vocab_size: int = 98) -> list[TrainSample]:
    rng = np.random.default_rng(0)
    samples = []
    for prompt_len, response_len in LENGTHS:
        samples.append(TrainSample(
            prompt_ids=rng.integers(3, vocab_size, prompt_len).astype(np.int32),
            response_ids=rng.integers(3, vocab_size, response_len).astype(np.int32),
            behaviour_logprobs=(-4.6 + 0.4 * rng.standard_normal(response_len)).astype(np.float32),
            teacher_logprobs=(-4.6 + rng.standard_normal(response_len)).astype(np.float32),
        ))
    return samples


def _fresh(model_dir: Path, mesh: DeviceMesh) -> tuple[nn.Module, torch.optim.Optimizer]:
    from asyncopd.learner.model import load_student, shard_model
    from asyncopd.learner.train import make_optimizer

    model = shard_model(load_student(model_dir), mesh)
    return model, make_optimizer(model, LEARNER_CFG)


def main(rank: int, world_size: int, init_file: str, model_dir: Path, out_dir: Path) -> None:
    import torch.distributed as dist

    from asyncopd.learner.checkpoint import checkpoint_dir, export_hf, latest_checkpoint, load_checkpoint, \
        save_checkpoint
    from asyncopd.learner.model import iter_full_weights, make_mesh
    from asyncopd.learner.train import train_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    mesh = make_mesh("cpu")
    samples = synthetic_samples()
    micro_batches = pack_micro_batches(samples[rank::world_size], TOKEN_BUDGET)
    run_dir = out_dir / "run"

    model, optimizer = _fresh(model_dir, mesh)
    result: dict = {"num_micro_batches": len(micro_batches)}
    result["weights_initial"] = dict(iter_full_weights(model))
    result["metrics"] = []
    for step in range(1, NUM_STEPS + 1):
        result["metrics"].append(train_step(model, optimizer, samples, LOSS_CFG, LEARNER_CFG, rank=rank,
                                            dp_size=world_size))
        if step == 1:
            save_checkpoint(checkpoint_dir(run_dir, step), model, optimizer, {"policy_version": step})
    result["weights_final"] = dict(iter_full_weights(model))
    with torch.no_grad():
        result["probe_logits"] = model(input_ids=PROBE_IDS).logits
    export_hf(model, out_dir / "hf", model_dir)

    resumed, resumed_optimizer = _fresh(model_dir, mesh)
    latest = latest_checkpoint(run_dir)
    result["latest"] = str(latest)
    result["extra"] = load_checkpoint(latest, resumed, resumed_optimizer)
    result["resumed_metrics"] = train_step(resumed, resumed_optimizer, samples, LOSS_CFG, LEARNER_CFG, rank=rank,
                                           dp_size=world_size)

    # Several updates per step (2 mini-batches x 2 epochs) from the initial weights.
    multi, multi_optimizer = _fresh(model_dir, mesh)
    result["multi_metrics"] = train_step(multi, multi_optimizer, samples, LOSS_CFG, MULTI_LEARNER_CFG, rank=rank,
                                         dp_size=world_size)
    result["multi_weights"] = dict(iter_full_weights(multi))
    torch.save(result, out_dir / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def run_rank(main) -> None:
    """Run ``main(RANK, WORLD_SIZE, INIT_FILE, MODEL_DIR, OUT_DIR)`` from argv, then exit at once."""
    logging.basicConfig(level=logging.INFO, format=f"[learner rank {sys.argv[1]}] %(name)s: %(message)s")
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), Path(sys.argv[5]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # gloo threads may abort at interpreter shutdown (notes/fsdp-cpu.md)


if __name__ == "__main__":
    run_rank(main)
