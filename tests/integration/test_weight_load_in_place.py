"""The in-place weight load (actor.cpu_gemm=plain on vLLM's CPU build) against a fresh engine.

An engine built from the old weights loads the new ones in place
(asyncopd.actor.weight_loading); an engine built from the new weights on disk must
then sample exactly the same tokens with bit-for-bit the same log-probs and top-k ids
(same seeds, same batch). The new weights differ from the old only by 0.1% on the
embedding, so the test also shows that a small change really lands: the samples'
log-probs move. For the tied model the update leaves ``lm_head.weight`` out (as the
learner sends it), so the logits head must follow the embedding it shares.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

from asyncopd.actor.engine import Completion, VllmEngine, engine_environment
from asyncopd.config import ActorConfig
from asyncopd.tasks.tiny import save_tiny_model, tiny_config

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 10
TOP_K = 8
NUM_PROMPTS = 6


@pytest.fixture
def build_engine() -> Iterator:
    """Builds engines (one at a time; each shut down by the next call or at the end)."""
    threads_before = torch.get_num_threads()
    live: list[VllmEngine] = []

    def build(path: Path, cpu_gemm: str = "plain") -> VllmEngine:
        for engine in live:
            engine.shutdown()
        cfg = ActorConfig(max_new_tokens=MAX_NEW_TOKENS, max_model_len=48, max_num_seqs=16,
                          temperature=0.8, kv_cache_gib=0.0625, cpu_gemm=cpu_gemm)
        with pytest.MonkeyPatch.context() as mp:
            for key, value in engine_environment(threads=1).items():
                mp.setenv(key, value)
            live.append(VllmEngine(str(path), cfg, seed=0, top_k=TOP_K))
        return live[-1]

    yield build
    for engine in live:
        engine.shutdown()
    torch.set_num_threads(threads_before)


def old_and_new(root: Path, tied: bool) -> tuple[Path, Path, Qwen2ForCausalLM]:
    """Saved old and new models (the new one: embedding x (1 + 0.001 * noise)) and the new model."""
    config = tiny_config(hidden_size=64, num_heads=2, num_kv_heads=1)
    config.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    old = save_tiny_model(root / "old", model=model)
    with torch.no_grad():
        embedding = model.get_input_embeddings().weight
        embedding.mul_(1 + 1e-3 * torch.randn(embedding.shape, generator=torch.Generator().manual_seed(1)))
    return old, save_tiny_model(root / "new", model=model), model


def sample(engine: VllmEngine, tag: str) -> list[Completion]:
    rng = np.random.default_rng(0)
    for i in range(NUM_PROMPTS):
        engine.add(f"{tag}-{i}", rng.integers(3, 98, size=5 + i).tolist(), seed=100 + i)
    done: dict[str, Completion] = {}
    while engine.num_unfinished:
        done.update((c.request_id, c) for c in engine.step(policy_version=0))
    return [done[f"{tag}-{i}"] for i in range(NUM_PROMPTS)]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_in_place_load_samples_exactly_like_a_fresh_engine(tmp_path: Path, build_engine, tied: bool) -> None:
    old_path, new_path, new_model = old_and_new(tmp_path, tied)
    engine = build_engine(old_path)
    assert engine.weight_loader == "in_place"
    before = sample(engine, "before")
    payload = [(name, p.detach()) for name, p in new_model.named_parameters()]
    assert ("lm_head.weight" in dict(payload)) is not tied  # a tied head is left out, as the learner does
    engine.load_weights(payload)
    after = sample(engine, "after")

    fresh = sample(build_engine(new_path), "fresh")
    for got, want in zip(after, fresh):
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        np.testing.assert_array_equal(got.logprobs, want.logprobs)
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
    moved = max(float(np.abs(a.logprobs[:n] - b.logprobs[:n]).max())
                for a, b in zip(after, before) if (n := min(len(a.logprobs), len(b.logprobs))))
    assert moved > 1e-5, "a 0.1% change of the embedding did not reach the samples: the load did not happen"


def test_packed_gemm_keeps_the_layerwise_reload(tmp_path: Path, build_engine) -> None:
    old_path, new_path, new_model = old_and_new(tmp_path, tied=True)
    engine = build_engine(old_path, cpu_gemm="packed")
    assert engine.weight_loader == "reload"
    engine.load_weights((name, p.detach()) for name, p in new_model.named_parameters())
    after = sample(engine, "after")
    fresh = sample(build_engine(new_path, cpu_gemm="packed"), "fresh")
    for got, want in zip(after, fresh):
        np.testing.assert_array_equal(got.token_ids, want.token_ids)
        np.testing.assert_array_equal(got.logprobs, want.logprobs)
