"""FSDP2 learner on 2 gloo CPU ranks against one unsharded process.

One module-scoped fixture starts both ranks (tests/distributed/_fsdp_worker.py)
once, with a file-based rendezvous (no port to race for), and ends them by their
handles if they overrun. The single-process reference trains the same tiny model
on the whole batch with ``dp_size=1`` and no process group.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asyncopd.learner.batching import pack_micro_batches
from asyncopd.learner.model import load_student, token_logprobs, token_stats
from asyncopd.learner.train import make_optimizer, train_step
from asyncopd.tasks.tiny import save_tiny_model

pytestmark = pytest.mark.distributed

WORKER = Path(__file__).with_name("_fsdp_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
TIMEOUT_S = 55.0


def _load_worker_module():
    spec = importlib.util.spec_from_file_location("_fsdp_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load_worker_module()


def _run_ranks(model_dir: Path, out_dir: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    init_file = out_dir / "rendezvous"
    procs, logs = [], []
    for rank in range(WORLD_SIZE):
        log = open(out_dir / f"rank{rank}.log", "w")
        logs.append(log)
        cmd = [sys.executable, str(WORKER), str(rank), str(WORLD_SIZE), str(init_file), str(model_dir), str(out_dir)]
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    failed = [rank for rank, proc in enumerate(procs) if proc.returncode != 0]
    if failed:
        tails = "\n".join(f"--- rank {r} ---\n{(out_dir / f'rank{r}.log').read_text()[-3000:]}" for r in failed)
        pytest.fail(f"ranks {failed} failed or exceeded {TIMEOUT_S}s:\n{tails}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("student"), seed=0)


@pytest.fixture(scope="module")
def sharded(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out_dir = tmp_path_factory.mktemp("fsdp")
    start = time.monotonic()
    _run_ranks(model_dir, out_dir)
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return {"ranks": results, "out_dir": out_dir, "wall_s": time.monotonic() - start}


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict:
    """The same 3 steps, one unsharded process, the whole batch."""
    torch.manual_seed(0)
    model = load_student(model_dir)
    optimizer = make_optimizer(model, worker.LEARNER_CFG)
    samples = worker.synthetic_samples()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = [train_step(model, optimizer, samples, worker.LOSS_CFG, worker.LEARNER_CFG)
               for _ in range(worker.NUM_STEPS)]
    multi = load_student(model_dir)
    multi_metrics = train_step(multi, make_optimizer(multi, worker.MULTI_LEARNER_CFG), samples, worker.LOSS_CFG,
                               worker.MULTI_LEARNER_CFG)
    return {"initial": initial, "final": model.state_dict(), "metrics": metrics,
            "multi_metrics": multi_metrics, "multi_final": multi.state_dict()}


def test_two_ranks_match_one_unsharded_process(sharded: dict, reference: dict) -> None:
    ranks = sharded["ranks"]
    assert [r["num_micro_batches"] for r in ranks] == [3, 1]  # uneven counts are equalised
    for step, ref in enumerate(reference["metrics"]):
        for rank in ranks:
            got = rank["metrics"][step]
            for key in ("learner/loss", "learner/rkl", "learner/is_clip_frac", "learner/is_ratio_mean",
                        "learner/grad_norm"):
                assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), (step, key)
            assert got["learner/num_tokens"] == ref["learner/num_tokens"] == 73
    assert reference["metrics"][0]["learner/grad_norm"] > worker.LEARNER_CFG.max_grad_norm  # clipping ran
    assert 0 < reference["metrics"][0]["learner/is_clip_frac"] < 1
    for name, expected in reference["final"].items():
        assert not torch.equal(expected, reference["initial"][name]), name  # training moved it
        torch.testing.assert_close(ranks[0]["weights_final"][name], expected, rtol=1e-5, atol=1e-5)


def test_several_updates_per_step_match_one_unsharded_process(sharded: dict, reference: dict) -> None:
    """2 mini-batches x 2 epochs: the same 4 updates on 2 ranks as in one process,
    and the PPO/IS quantities act against the pre-step log-probs (ratios move)."""
    ref = reference["multi_metrics"]
    assert ref["learner/updates"] == 4
    for rank in sharded["ranks"]:
        got = rank["multi_metrics"]
        for key in ("learner/loss", "learner/rkl", "learner/is_ratio_mean", "learner/grad_norm",
                    "learner/pg_loss", "learner/ppo_clip_frac", "learner/adv_std"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    for name, expected in reference["multi_final"].items():
        torch.testing.assert_close(sharded["ranks"][0]["multi_weights"][name], expected, rtol=1e-5, atol=1e-5)
    single = reference["metrics"][0]
    # lp_old stays the pre-step policy (same rkl), while later updates see moved weights (pg loss).
    assert ref["learner/rkl"] == pytest.approx(single["learner/rkl"], rel=1e-6)
    assert ref["learner/pg_loss"] != pytest.approx(single["learner/pg_loss"], rel=1e-4)


def test_checkpoint_resume_reproduces_step_two(sharded: dict) -> None:
    for rank in sharded["ranks"]:
        assert rank["latest"].endswith("checkpoints/step_1")
        assert rank["extra"] == {"policy_version": 1}
        assert rank["resumed_metrics"]["learner/loss"] == pytest.approx(rank["metrics"][1]["learner/loss"],
                                                                        rel=1e-6, abs=1e-7)
        assert rank["resumed_metrics"]["learner/grad_norm"] == pytest.approx(
            rank["metrics"][1]["learner/grad_norm"], rel=1e-6)


def test_iter_full_weights_matches_unsharded_state_dict(sharded: dict, reference: dict) -> None:
    rank0, rank1 = sharded["ranks"]
    # Same names as the HF state dict (a tied lm_head.weight follows its embedding at once).
    assert sorted(rank0["weights_initial"]) == sorted(reference["initial"])
    assert "lm_head.weight" in rank0["weights_initial"]
    for name, expected in reference["initial"].items():
        assert torch.equal(rank0["weights_initial"][name], expected), name
        assert torch.equal(rank1["weights_initial"][name], expected), name
    for name, tensor in rank0["weights_final"].items():
        assert torch.equal(rank1["weights_final"][name], tensor), name


def test_export_hf_round_trips(sharded: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = sharded["out_dir"] / "hf"
    assert not (sharded["out_dir"] / "hf.tmp").exists()
    exported = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    state = exported.state_dict()
    for name, tensor in sharded["ranks"][0]["weights_final"].items():
        assert torch.equal(state[name], tensor), name
    with torch.no_grad():
        logits = exported(input_ids=worker.PROBE_IDS).logits
    torch.testing.assert_close(logits, sharded["ranks"][0]["probe_logits"], rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(str(hf_dir)).eos_token == "<eos>"


def test_token_logprobs_match_full_log_softmax(model_dir: Path) -> None:
    """Chunked log-probs equal a plain full-vocabulary log-softmax, in the batch layout."""
    model = load_student(model_dir)
    (mb,) = pack_micro_batches(worker.synthetic_samples()[1::2], token_budget=1000)
    with torch.no_grad():
        full = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits.log_softmax(-1)
        expected = full[:, :-1].gather(-1, mb.input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
        got = token_logprobs(model, mb.input_ids, mb.attention_mask, chunk_tokens=7)  # [B, T]
    assert got.shape == mb.input_ids.shape and torch.all(got[:, -1] == 0)
    mask = mb.attention_mask[:, 1:].bool()
    torch.testing.assert_close(got[:, :-1][mask], expected[mask], rtol=1e-5, atol=1e-5)


def test_token_stats_entropy_and_candidate_logprobs(model_dir: Path) -> None:
    """Entropy and candidate-id log-probs equal a dense log-softmax, gradients included."""
    model = load_student(model_dir)
    (mb,) = pack_micro_batches(worker.synthetic_samples()[1::2], token_budget=1000)
    batch, seq = mb.input_ids.shape
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq, 4), generator=gen)
    ids[..., -1] = -1  # padding candidates
    ids[0, 0, :] = -1
    stats = token_stats(model, mb.input_ids, mb.attention_mask, topk_ids=ids, entropy=True, chunk_tokens=5)
    dense = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits.float().log_softmax(-1)
    mask = mb.attention_mask[:, 1:].bool()  # positions that predict a real token
    entropy = -(dense.exp() * dense).sum(-1)[:, :-1]  # [B, T-1]
    torch.testing.assert_close(stats.entropy[:, :-1][mask], entropy[mask], rtol=1e-5, atol=1e-5)
    valid = ids[:, :-1] >= 0
    candidates = dense[:, :-1].gather(-1, ids[:, :-1].clamp(min=0))  # [B, T-1, K]
    got = stats.topk_logprobs[:, :-1]
    torch.testing.assert_close(got[valid & mask[..., None]], candidates[valid & mask[..., None]],
                               rtol=1e-5, atol=1e-5)
    assert torch.all(got[~valid] == -float("inf"))
    # Gradients of a finite combination agree with the dense path.
    weights = torch.rand(batch, seq - 1, 4, generator=gen)
    chunked = (stats.entropy[:, :-1][mask].sum()
               + torch.where(valid, got * weights, torch.zeros_like(got)).sum())
    reference = (entropy[mask].sum() + torch.where(valid, candidates * weights, torch.zeros_like(candidates)).sum())
    grads = torch.autograd.grad(chunked, list(model.parameters()), allow_unused=True)
    expected = torch.autograd.grad(reference, list(model.parameters()), allow_unused=True)
    for g, e in zip(grads, expected):
        if e is not None:
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
