"""Seeded sampling when the scheduler's token budget cannot hold every prompt at once.

vLLM's scheduler splits a prompt's prefill across steps (chunked prefill) when its
token budget runs out mid-prompt. For a partially prefilled request with a
per-request seed, vLLM rewinds that request's generator, which a CPU generator
cannot do: ``RuntimeError: CPU Generator does not use offset`` killed the actor
(issue 8). The engine now never splits a prefill; these tests fill the budget many
times over and check that sampling still completes, is reproducible from the seed
whatever the batch makeup, and that an over-long prompt keeps its clear error.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from asyncopd.actor.engine import Completion, VllmEngine, engine_environment
from asyncopd.config import ActorConfig
from asyncopd.tasks.tiny import save_tiny_model

pytestmark = pytest.mark.integration

MAX_NEW_TOKENS = 6
MAX_MODEL_LEN = 256
PROMPT_TOKENS = 150
NUM_PROMPTS = 40  # 40 x 150 = 6,000 prompt tokens: several times vLLM's 2,048-token budget


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmEngine]:
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=64, num_heads=2,
                           num_kv_heads=1, max_positions=MAX_MODEL_LEN)
    # max_num_seqs well above what one budget holds, so the scheduler would split a prefill.
    cfg = ActorConfig(max_new_tokens=MAX_NEW_TOKENS, max_model_len=MAX_MODEL_LEN, max_num_seqs=NUM_PROMPTS,
                      kv_cache_gib=0.0625)
    threads_before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in engine_environment(threads=1).items():
            mp.setenv(key, value)
        engine = VllmEngine(str(path), cfg, seed=0)
    yield engine
    engine.shutdown()
    torch.set_num_threads(threads_before)


def prompts(offset: int) -> list[list[int]]:
    rng = np.random.default_rng(offset)
    # ids 3..40 are printable characters of the tiny char tokenizer; lengths vary around the budget
    return [rng.integers(3, 40, size=PROMPT_TOKENS - (i % 7)).tolist() for i in range(NUM_PROMPTS)]


def sample(engine: VllmEngine, batch: list[list[int]], ids: list[str], seeds: list[int]) -> dict[str, Completion]:
    for request_id, prompt, seed in zip(ids, batch, seeds):
        engine.add(request_id, prompt, seed=seed)
    done: dict[str, Completion] = {}
    for _ in range(50 * MAX_NEW_TOKENS):
        if not engine.num_unfinished:
            break
        done.update((c.request_id, c) for c in engine.step(policy_version=0))
    assert engine.num_unfinished == 0
    return done


def test_seeded_sampling_survives_a_full_token_budget(engine: VllmEngine) -> None:
    batch = prompts(0)
    done = sample(engine, batch, [f"a{i}" for i in range(NUM_PROMPTS)], list(range(NUM_PROMPTS)))
    assert sorted(done) == sorted(f"a{i}" for i in range(NUM_PROMPTS))
    assert all(len(c.token_ids) == MAX_NEW_TOKENS for c in done.values())
    assert all(np.isfinite(c.logprobs).all() and (c.logprobs <= 0).all() for c in done.values())


def test_seeded_samples_do_not_depend_on_batch_makeup(engine: VllmEngine) -> None:
    batch = prompts(1)
    full = sample(engine, batch, [f"b{i}" for i in range(NUM_PROMPTS)], [100 + i for i in range(NUM_PROMPTS)])
    # The same requests again, in reverse order and interleaved with other seeded prompts.
    others = prompts(2)
    ids = [f"c{i}" for i in reversed(range(NUM_PROMPTS))] + [f"x{i}" for i in range(NUM_PROMPTS // 2)]
    mixed_batch = list(reversed(batch)) + others[: NUM_PROMPTS // 2]
    seeds = [100 + i for i in reversed(range(NUM_PROMPTS))] + [7 + i for i in range(NUM_PROMPTS // 2)]
    again = sample(engine, mixed_batch, ids, seeds)
    for i in range(NUM_PROMPTS):
        np.testing.assert_array_equal(full[f"b{i}"].token_ids, again[f"c{i}"].token_ids)
        # The fixture's engine has the default actor.cpu_gemm; oneDNN's kernels (packed) do
        # not depend on the batch's size.
        if ActorConfig().cpu_gemm == "packed":
            np.testing.assert_array_equal(full[f"b{i}"].logprobs, again[f"c{i}"].logprobs)
        else:  # torch's linear picks its kernel by batch size: last-bit differences (seen 4.8e-7)
            np.testing.assert_allclose(full[f"b{i}"].logprobs, again[f"c{i}"].logprobs, atol=1e-5, rtol=0)
    # and the seed matters
    assert any(not np.array_equal(full[f"b{i}"].token_ids, full[f"b{i + 1}"].token_ids) for i in range(10))


def test_over_long_prompt_keeps_its_error(engine: VllmEngine) -> None:
    limit = MAX_MODEL_LEN - MAX_NEW_TOKENS
    with pytest.raises(ValueError, match=rf"prompt of {limit + 1} tokens exceeds the limit of {limit}"):
        engine.add("too-long", [5] * (limit + 1), seed=0)
    assert engine.num_unfinished == 0
