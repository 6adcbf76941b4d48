"""The actor's in-process vLLM engine against a Hugging Face forward of the same model.

One engine serves the whole module (start-up costs seconds). It returns the
behaviour top-k (teacher.top_k = TOP_K) for sampled requests, so every sampled
request also runs the top-k path; greedy requests run the plain one. Tests that
load new weights record them in ``state.reference``, the HF model the engine should
now match, so every test compares against the right weights whatever ran before it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from asyncopd.actor.engine import Completion, VllmEngine, WeightPayloadError, engine_environment
from asyncopd.config import ActorConfig
from asyncopd.tasks.tiny import save_tiny_model

pytestmark = pytest.mark.integration

TEMPERATURE = 0.8  # != 1, so raw and processed log-probs differ
MAX_NEW_TOKENS = 12
TOP_K = 24  # above vLLM's default max_logprobs (20): the engine must raise that cap


@dataclass
class EngineState:
    engine: VllmEngine
    cfg: ActorConfig
    reference: PreTrainedModel
    """An HF model holding the weights the engine should be serving now."""


@pytest.fixture(scope="module", params=["packed", "plain"])
def state(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[EngineState]:
    """Every test runs on both actor.cpu_gemm kinds (oneDNN handles, plain torch linear)."""
    # head_dim = 64 / 2 = 32: vLLM's CPU attention supports no head_dim below 32.
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0,
                           hidden_size=64, num_heads=2, num_kv_heads=1)
    cfg = ActorConfig(max_new_tokens=MAX_NEW_TOKENS, max_model_len=48, max_num_seqs=16,
                      temperature=TEMPERATURE, kv_cache_gib=0.0625, cpu_gemm=request.param)
    threads_before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in engine_environment(threads=1).items():
            mp.setenv(key, value)
        engine = VllmEngine(str(path), cfg, seed=0, top_k=TOP_K)
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    yield EngineState(engine=engine, cfg=cfg, reference=reference)
    engine.shutdown()
    torch.set_num_threads(threads_before)  # the engine applied OMP_NUM_THREADS=1 process-wide


@pytest.fixture(autouse=True)
def no_leftover_requests(state: EngineState) -> Iterator[None]:
    """A failing test must not leave requests in flight for the next one."""
    yield
    state.engine.abort_all()


def run_to_completion(engine: VllmEngine, policy_version: int) -> dict[str, Completion]:
    done: dict[str, Completion] = {}
    for _ in range(10 * MAX_NEW_TOKENS):
        if not engine.num_unfinished:
            return done
        done.update((c.request_id, c) for c in engine.step(policy_version))
    raise AssertionError(f"{engine.num_unfinished} requests did not finish")


def generate(engine: VllmEngine, batch: list[list[int]], tag: str, *, seed: int,
             policy_version: int) -> list[Completion]:
    """Sample every prompt of ``batch`` (seeds seed, seed+1, ...); completions in batch order."""
    for i, prompt in enumerate(batch):
        engine.add(f"{tag}-{i}", prompt, seed=seed + i)
    done = run_to_completion(engine, policy_version)
    assert sorted(done) == sorted(f"{tag}-{i}" for i in range(len(batch)))
    return [done[f"{tag}-{i}"] for i in range(len(batch))]


@torch.no_grad()
def hf_dense_logprobs(model: PreTrainedModel, prompt: list[int], tokens: np.ndarray) -> torch.Tensor:
    """[n, vocab]: the sampling distribution (at TEMPERATURE) at every generated position."""
    ids = torch.tensor([prompt + tokens.tolist()])
    logits = model(ids).logits[0, len(prompt) - 1 : -1] / TEMPERATURE
    return torch.log_softmax(logits.float(), dim=-1)


def hf_logprobs(model: PreTrainedModel, prompt: list[int], tokens: np.ndarray) -> np.ndarray:
    """log p(token_t | prompt, tokens_<t) at the sampling temperature, from one HF forward."""
    logprobs = hf_dense_logprobs(model, prompt, tokens)
    return logprobs.gather(-1, torch.from_numpy(tokens).long()[:, None])[:, 0].numpy()


def assert_topk_matches_hf(model: PreTrainedModel, prompt: list[int], completion: Completion,
                           atol: float = 1e-4) -> None:
    """The engine's top-k ids are HF's k most likely ids at each position, most likely first
    (compared through their HF log-probs, so exact ties cannot fail it)."""
    logprobs = hf_dense_logprobs(model, prompt, completion.token_ids)
    n = len(completion.token_ids)
    assert completion.topk_ids is not None and completion.topk_ids.dtype == np.int32
    assert completion.topk_ids.shape == (n, TOP_K)
    assert all(len(set(row)) == TOP_K for row in completion.topk_ids.tolist())
    got = logprobs.gather(-1, torch.from_numpy(completion.topk_ids).long()).numpy()
    want = logprobs.topk(TOP_K, dim=-1).values.numpy()
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def prompts(num: int, length: int = 6, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 98, size=length).tolist() for _ in range(num)]


def perturbed(model: PreTrainedModel, seed: int, scale: float = 0.05) -> PreTrainedModel:
    new = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in new.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return new


def full_payload(model: PreTrainedModel) -> list[tuple[str, torch.Tensor]]:
    """Every named parameter plus the tied head (named_parameters() skips it)."""
    payload = [(name, p.detach()) for name, p in model.named_parameters()]
    return payload + [("lm_head.weight", model.get_output_embeddings().weight.detach())]


def test_behaviour_logprobs_match_hf_forward(state: EngineState) -> None:
    engine, eos = state.engine, state.engine.eos_token_id
    batch = prompts(8, seed=1)
    for prompt, completion in zip(batch, generate(engine, batch, "lp", seed=0, policy_version=3)):
        n = len(completion.token_ids)
        assert completion.token_ids.dtype == np.int32 and completion.logprobs.dtype == np.float32
        assert completion.logprobs.shape == completion.token_policy_versions.shape == (n,)
        assert (completion.token_policy_versions == 3).all()
        if completion.finish_reason == "stop":  # EOS is returned as the last token
            assert completion.token_ids[-1] == eos and eos not in completion.token_ids[:-1]
        else:
            assert completion.finish_reason == "length" and n == MAX_NEW_TOKENS
        expected = hf_logprobs(state.reference, prompt, completion.token_ids)
        np.testing.assert_allclose(completion.logprobs, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_scoring_returns_the_temperature_1_logprobs_of_a_given_response(state: EngineState) -> None:
    """Teacher-forced scoring (the eval's NLL of teacher samples): raw log-probs, beside sampled
    requests, with a sequence that fills the model length minus the one throwaway token."""
    engine, cfg = state.engine, state.cfg
    rng = np.random.default_rng(7)
    cases = [(prompts(1, length=6, seed=20)[0], rng.integers(3, 98, size=MAX_NEW_TOKENS).tolist()),
             (prompts(1, length=30, seed=21)[0], rng.integers(3, 98, size=cfg.max_model_len - 31).tolist())]
    for i, (prompt, response) in enumerate(cases):
        engine.add_scoring(f"score-{i}", prompt, response)
        engine.add(f"beside-{i}", prompt, seed=i)
    done = run_to_completion(engine, policy_version=2)
    for i, (prompt, response) in enumerate(cases):
        completion = done[f"score-{i}"]
        assert completion.finish_reason == "scored"
        assert completion.token_ids.tolist() == response
        assert completion.token_policy_versions.tolist() == [2] * len(response)
        logits = state.reference(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.tensor(response)[:, None])[:, 0]
        np.testing.assert_allclose(completion.logprobs, expected.numpy(), atol=1e-4, rtol=0)
        assert done[f"beside-{i}"].finish_reason in ("stop", "length")
    with pytest.raises(ValueError, match="actor.max_model_len - 1"):
        engine.add_scoring("too-long", cases[1][0], cases[1][1] + [5])


def test_behaviour_topk_ids_match_hf_forward(state: EngineState) -> None:
    engine = state.engine
    batch = prompts(8, seed=11)
    sampled_outside = 0
    for prompt, completion in zip(batch, generate(engine, batch, "topk", seed=50, policy_version=3)):
        assert_topk_matches_hf(state.reference, prompt, completion)
        # vLLM also reports the sampled token when it ranks below k; it must not leak in.
        sampled_outside += sum(t not in row for t, row in zip(completion.token_ids, completion.topk_ids.tolist()))
    assert sampled_outside > 0, "no sampled token ranked below the top-k; the test did not exercise that case"


def test_weights_load_in_place_with_plain_gemm_and_reload_when_packed(state: EngineState) -> None:
    # plain: vLLM's linear layers multiply with their live weights (checked on the model,
    # so a vLLM that packs them anyway falls back to the reload and fails this test).
    assert state.engine.weight_loader == {"plain": "in_place", "packed": "reload"}[state.cfg.cpu_gemm]


def test_requests_stop_at_the_tokenizers_eos_with_the_cached_id(state: EngineState) -> None:
    """vLLM's per-request EOS lookup is answered from a cache (vllm_setup); it must be the
    tokenizer's id, and sampling it must end the request."""
    engine = state.engine
    assert engine._engine.input_processor.renderer.get_eos_token_id() == engine.eos_token_id is not None
    batch = prompts(48, seed=30)
    stopped = [c for c in generate(engine, batch, "eos", seed=300, policy_version=0) if c.finish_reason == "stop"]
    assert stopped, "no request sampled EOS; the test did not exercise the stop"
    assert all(c.token_ids[-1] == engine.eos_token_id for c in stopped)


def test_load_weights_changes_the_policy_to_the_new_weights(state: EngineState) -> None:
    engine, old = state.engine, state.reference
    new = perturbed(old, seed=10)
    seconds = engine.load_weights(full_payload(new))
    state.reference = new
    assert 0 < seconds < 30

    batch = prompts(6, seed=2)
    max_change = 0.0
    for prompt, completion in zip(batch, generate(engine, batch, "new", seed=100, policy_version=4)):
        np.testing.assert_allclose(completion.logprobs, hf_logprobs(new, prompt, completion.token_ids),
                                   atol=1e-3, rtol=0)
        assert_topk_matches_hf(new, prompt, completion, atol=1e-3)
        stale = hf_logprobs(old, prompt, completion.token_ids)
        max_change = max(max_change, float(np.abs(completion.logprobs - stale).max()))
    assert max_change > 1e-2, "the engine still samples from the old weights"


def test_weight_load_mid_generation_tags_tokens_with_their_version(state: EngineState) -> None:
    engine, old = state.engine, state.reference
    batch = prompts(6, seed=3)
    for i, prompt in enumerate(batch):
        engine.add(f"mid-{i}", prompt, seed=200 + i)
    steps_before = 4  # one token per running request per step (the first step prefills too)
    done: dict[str, Completion] = {}
    for _ in range(steps_before):
        done.update((c.request_id, c) for c in engine.step(policy_version=5))
    new = perturbed(old, seed=11)
    engine.load_weights(full_payload(new))
    state.reference = new
    done.update(run_to_completion(engine, policy_version=6))

    crossed = 0
    for i, prompt in enumerate(batch):
        completion = done[f"mid-{i}"]
        n = len(completion.token_ids)
        k = min(n, steps_before)
        expected_versions = [5] * k + [6] * (n - k)
        assert completion.token_policy_versions.tolist() == expected_versions
        if n > k:
            crossed += 1
            # Old tokens came from the old weights; new ones from the new weights with the
            # KV of the whole sequence recomputed (no stale cache).
            np.testing.assert_allclose(completion.logprobs[:k], hf_logprobs(old, prompt, completion.token_ids)[:k],
                                       atol=1e-3, rtol=0)
            np.testing.assert_allclose(completion.logprobs[k:], hf_logprobs(new, prompt, completion.token_ids)[k:],
                                       atol=1e-3, rtol=0)
    assert crossed >= 1, "no request was in flight across the weight load"


def test_greedy_and_seeded_requests_are_deterministic(state: EngineState) -> None:
    engine = state.engine
    prompt = prompts(1, seed=4)[0]
    engine.add("greedy-a", prompt, greedy=True)
    engine.add("seeded-a", prompt, seed=42)
    for i, other in enumerate(prompts(5, seed=5)):  # different batch company
        engine.add(f"noise-{i}", other)
    engine.add("greedy-b", prompt, greedy=True)
    first = run_to_completion(engine, policy_version=0)
    engine.add("greedy-c", prompt, greedy=True)
    engine.add("seeded-b", prompt, seed=42)
    second = run_to_completion(engine, policy_version=0)

    greedy = first["greedy-a"].token_ids.tolist()
    assert first["greedy-a"].topk_ids is None  # greedy samples are scored for accuracy only
    assert greedy == first["greedy-b"].token_ids.tolist() == second["greedy-c"].token_ids.tolist()
    with torch.no_grad():  # greedy means argmax of the model at every step
        ids = torch.tensor([prompt + greedy])
        argmax = state.reference(ids).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
    assert greedy == argmax
    assert first["seeded-a"].token_ids.tolist() == second["seeded-b"].token_ids.tolist()
    if state.cfg.cpu_gemm == "packed":  # oneDNN's kernels do not depend on the batch's size
        np.testing.assert_array_equal(first["seeded-a"].logprobs, second["seeded-b"].logprobs)
    else:  # torch's linear picks its kernel by batch size: last-bit differences (measured 9.5e-7)
        np.testing.assert_allclose(first["seeded-a"].logprobs, second["seeded-b"].logprobs, atol=1e-5, rtol=0)


def test_vllm_shortcuts_sample_exactly_like_vllms_own_code(state: EngineState,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine is built with asyncopd.actor.vllm_shortcuts; taking them back (and giving
    prompts as TokensPrompt) must not change one id, log-prob or top-k id: same batch,
    same seeds, the same batch makeup."""
    from vllm.inputs import TokensPrompt

    from asyncopd.actor import engine as engine_module
    from asyncopd.actor import vllm_shortcuts

    llm = state.engine._engine
    assert llm.collective_rpc(vllm_shortcuts.install_seeded_draws) == ["seeded draws: already installed"]
    batch = prompts(6, seed=11)
    fast = generate(state.engine, batch, "fast", seed=500, policy_version=0)
    llm.collective_rpc(vllm_shortcuts.remove_seeded_draws)
    vllm_shortcuts.remove_flat_logprobs_append()
    vllm_shortcuts.remove_counter_request_ids(llm)
    monkeypatch.setattr(engine_module, "_tokens_input", lambda ids: TokensPrompt(prompt_token_ids=ids))
    try:
        plain = generate(state.engine, batch, "plain", seed=500, policy_version=0)
    finally:
        assert llm.collective_rpc(vllm_shortcuts.install_seeded_draws)[0].startswith("seeded draws: on")
        vllm_shortcuts.install_flat_logprobs_append()
        vllm_shortcuts.install_counter_request_ids(llm)
    for a, b in zip(fast, plain):
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.logprobs, b.logprobs)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.token_policy_versions, b.token_policy_versions)
    assert sum(len(c.token_ids) for c in fast) > len(fast)  # several decode steps, not one


def test_overlong_prompt_is_refused_with_the_limit_and_fix(state: EngineState) -> None:
    engine = state.engine
    limit = state.cfg.max_model_len - state.cfg.max_new_tokens
    assert engine.max_prompt_tokens == limit
    with pytest.raises(ValueError, match=rf"exceeds the limit of {limit}.*raise actor.max_model_len"):
        engine.add("too-long", [5] * (limit + 1))
    assert engine.num_unfinished == 0
    engine.add("at-limit", [5] * limit)  # the boundary itself is accepted
    done = run_to_completion(engine, policy_version=0)
    assert len(done["at-limit"].token_ids) >= 1


@pytest.mark.parametrize("problem", ["unknown name", "wrong shape", "missing tensor"])
def test_bad_payload_is_refused_before_loading_and_engine_survives(state: EngineState, problem: str) -> None:
    engine, current = state.engine, state.reference
    payload = full_payload(perturbed(current, seed=12))
    if problem == "unknown name":
        payload.append(("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64)))
        match = "unknown parameter name 'model.layers.9"
    elif problem == "wrong shape":
        name, tensor = payload[1]
        payload[1] = (name, tensor[:-1])
        match = f"'{name}' has shape"
    else:
        payload = payload[:-3]
        match = "parameters missing"
    with pytest.raises(WeightPayloadError, match=match):
        engine.load_weights(payload)

    prompt = prompts(1, seed=6)[0]
    engine.add("after-bad", prompt, seed=7)
    completion = run_to_completion(engine, policy_version=0)["after-bad"]
    # Still alive, and still serving the weights it had: nothing of the bad payload landed.
    np.testing.assert_allclose(completion.logprobs, hf_logprobs(current, prompt, completion.token_ids),
                               atol=1e-3, rtol=0)


def test_abort_returns_partial_completion(state: EngineState) -> None:
    engine = state.engine
    engine.add("to-abort", prompts(1, seed=8)[0], seed=1)
    engine.step(policy_version=9)  # prefill and the first token
    partial = engine.abort("to-abort")
    assert partial.finish_reason == "abort" and len(partial.token_ids) == 1
    assert partial.token_policy_versions.tolist() == [9] * len(partial.token_ids)
    assert partial.topk_ids.shape == (len(partial.token_ids), TOP_K)
    assert engine.num_unfinished == 0
    assert run_to_completion(engine, policy_version=9) == {}
    engine.add("to-abort", prompts(1, seed=8)[0], seed=1)  # the id is free again
    assert [c.request_id for c in engine.abort_all()] == ["to-abort"]


def test_tied_head_follows_the_embedding_when_left_out(state: EngineState) -> None:
    engine, old = state.engine, state.reference
    new = perturbed(old, seed=13)
    engine.load_weights((name, p.detach()) for name, p in new.named_parameters())  # no lm_head.weight
    state.reference = new
    prompt = prompts(1, seed=9)[0]
    engine.add("tied", prompt, seed=3)
    completion = run_to_completion(engine, policy_version=0)["tied"]
    np.testing.assert_allclose(completion.logprobs, hf_logprobs(new, prompt, completion.token_ids),
                               atol=1e-3, rtol=0)
