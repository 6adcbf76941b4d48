"""The actor's shortcuts through vLLM's per-request Python against the vLLM code they replace.

Each shortcut (asyncopd.actor.vllm_shortcuts) must produce exactly what vLLM's own code
produces: the same sampled tokens and log-probs, the same log-prob lists, request ids
as unique. These tests run both on the same inputs (vLLM's real CPU sampler and
log-prob processor; no engine), so they fail when vLLM's internals move under the
shortcuts.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from vllm.logprobs import FlatLogprobs  # noqa: E402
from vllm.v1.engine.logprobs import LogprobsProcessor  # noqa: E402
from vllm.v1.outputs import LogprobsLists  # noqa: E402
from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler  # noqa: E402

from asyncopd.actor import vllm_shortcuts  # noqa: E402
from asyncopd.actor.vllm_shortcuts import SeededDraws  # noqa: E402

VOCAB = 40


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_seeded_draws_hand_out_the_values_of_one_draw_at_a_time() -> None:
    draws = SeededDraws(per_refill=4)  # refills every 4 draws
    a, b = seeded(7), seeded(8)
    one_by_one = {g: seeded(s) for g, s in ((a, 7), (b, 8))}
    for _ in range(10):
        expected = [torch.randint(0, 2**31, (1,), generator=one_by_one[g], dtype=torch.long).item() for g in (a, b)]
        assert draws.take([a, b]) == expected


def cpu_sampler() -> TopKTopPSampler:
    import vllm._custom_ops  # noqa: F401  (loads vLLM's kernels: torch.ops._C.fused_gumbel_argmax)

    sampler = TopKTopPSampler("processed_logprobs")
    if getattr(sampler.forward, "__func__", None) is not TopKTopPSampler.forward_cpu:
        pytest.skip("vLLM's CPU sampler is not this platform's sampler")
    return sampler


def test_sampler_with_seeded_draws_samples_exactly_like_vllms_forward_cpu() -> None:
    vllm_sampler, sampler = cpu_sampler(), cpu_sampler()
    shortcut = vllm_shortcuts._forward_cpu_with_draws(sampler, sampler.forward, SeededDraws(per_refill=3))
    logits_rng = seeded(0)
    ours: dict[str, torch.Generator] = {}
    theirs: dict[str, torch.Generator] = {}
    # Requests come and go and change rows between steps, as in vLLM's persistent batch;
    # rows without a generator are unseeded (vLLM draws their seeds from the global generator).
    batches = [["a", "b", None, "c"], ["b", "a", "c", None], ["c", "d"], [None, "d", "e", "c", "f"],
               ["d", "e", "f"], ["f", "e", None], ["e"], ["e", "g"]]
    for step, rows in enumerate(batches):
        for name in rows:
            if name is not None and name not in ours:
                ours[name], theirs[name] = seeded(1000 + ord(name)), seeded(1000 + ord(name))
        logits = torch.randn(len(rows), VOCAB, generator=logits_rng) * 2
        k = torch.full((len(rows),), 5, dtype=torch.int32) if step % 3 == 1 else None
        p = torch.full((len(rows),), 0.9) if step % 3 == 2 else None
        torch.manual_seed(step)
        ids_vllm, logprobs_vllm = vllm_sampler.forward(
            logits.clone(), {i: theirs[n] for i, n in enumerate(rows) if n is not None}, k, p)
        global_after_vllm = torch.random.get_rng_state()
        torch.manual_seed(step)
        ids, logprobs = shortcut(logits.clone(), {i: ours[n] for i, n in enumerate(rows) if n is not None}, k, p)
        assert torch.equal(ids, ids_vllm), f"step {step}"
        assert torch.equal(logprobs, logprobs_vllm), f"step {step}"
        assert torch.equal(torch.random.get_rng_state(), global_after_vllm)  # the global stream moved alike


def fake_worker(sampler: TopKTopPSampler) -> SimpleNamespace:
    model_config = SimpleNamespace(get_vocab_size=lambda: VOCAB)
    return SimpleNamespace(model_runner=SimpleNamespace(sampler=SimpleNamespace(topk_topp_sampler=sampler),
                                                        model_config=model_config))


def test_seeded_draws_install_on_the_cpu_sampler_only_and_come_off_again() -> None:
    sampler = cpu_sampler()
    worker = fake_worker(sampler)
    on = f"seeded draws: on ({vllm_shortcuts.DRAWS_PER_REFILL} per refill)"
    assert vllm_shortcuts.install_seeded_draws(worker) == on
    assert sampler.forward.asyncopd_seeded_draws is not None
    assert vllm_shortcuts.install_seeded_draws(worker) == "seeded draws: already installed"
    vllm_shortcuts.remove_seeded_draws(worker)
    assert sampler.forward.__func__ is TopKTopPSampler.forward_cpu

    native = TopKTopPSampler("processed_logprobs")
    native.forward = native.forward_native  # as on CUDA with per-request generators
    assert vllm_shortcuts.install_seeded_draws(fake_worker(native)).startswith("seeded draws: off (the sampler runs")
    assert native.forward.__func__ is TopKTopPSampler.forward_native


def test_seeded_draws_stay_off_when_the_check_finds_other_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = cpu_sampler()

    def one_draw_too_many(generators):  # a shortcut that would shift every request's seeds
        return [torch.randint(0, 2**31, (2,), generator=g, dtype=torch.long)[1].item() for g in generators]

    monkeypatch.setattr(SeededDraws, "take", lambda self, generators: one_draw_too_many(generators))
    assert vllm_shortcuts.install_seeded_draws(fake_worker(sampler)).startswith("seeded draws: off (step 0: tokens")
    assert sampler.forward.__func__ is TopKTopPSampler.forward_cpu


def logprobs_lists(num_positions: int, num_logprobs: int, rng: np.random.Generator) -> LogprobsLists:
    """One engine step's log-prob rows of one request: the sampled id first, then the top-k."""
    ids = np.stack([np.concatenate([[rng.integers(VOCAB)], rng.permutation(VOCAB)[:num_logprobs]])
                    for _ in range(num_positions)]).astype(np.int32)
    values = -rng.random((num_positions, num_logprobs + 1)).astype(np.float32)
    ranks = rng.integers(1, VOCAB, num_positions)
    return LogprobsLists(ids, values, ranks)


@pytest.mark.parametrize("num_logprobs", [0, 1, 16])
def test_flat_logprob_appends_fill_the_lists_vllm_fills(num_logprobs: int) -> None:
    def processor() -> LogprobsProcessor:
        return LogprobsProcessor(tokenizer=None, logprobs=FlatLogprobs(), prompt_logprobs=None, cumulative_logprob=0.0,
                                 num_logprobs=num_logprobs, num_prompt_logprobs=None)

    # Process-wide: an engine built earlier in this process installed it already.
    installed_before = hasattr(LogprobsProcessor._update_sample_logprobs, "asyncopd_vllm_method")
    vllm_shortcuts.remove_flat_logprobs_append()
    vllm_update = LogprobsProcessor._update_sample_logprobs
    assert not hasattr(vllm_update, "asyncopd_vllm_method")
    ours, theirs = processor(), processor()
    rng = np.random.default_rng(num_logprobs)
    assert vllm_shortcuts.install_flat_logprobs_append()
    try:
        assert not vllm_shortcuts.install_flat_logprobs_append()  # once
        for num_positions in (1, 1, 2, 1, 3):
            step = logprobs_lists(num_positions, num_logprobs, rng)
            ours._update_sample_logprobs(step)
            vllm_update(theirs, step)
    finally:
        vllm_shortcuts.remove_flat_logprobs_append()
        assert LogprobsProcessor._update_sample_logprobs is vllm_update
        if installed_before:
            vllm_shortcuts.install_flat_logprobs_append()
    assert ours.logprobs == theirs.logprobs  # every list: ids, log-probs, ranks, decoded, start/end indices
    assert len(ours.logprobs) == 8 and len(ours.logprobs.token_ids) == 8 * (num_logprobs + 1)
    assert ours.cumulative_logprob == theirs.cumulative_logprob


def test_flat_logprob_appends_leave_detokenized_requests_to_vllm() -> None:
    calls = []
    fake_vllm = lambda self, lists: calls.append(lists)  # noqa: E731
    update = vllm_shortcuts._flat_append(fake_vllm)
    request = LogprobsProcessor(tokenizer=object(), logprobs=FlatLogprobs(), prompt_logprobs=None,
                                cumulative_logprob=0.0, num_logprobs=2, num_prompt_logprobs=None)
    lists = logprobs_lists(1, 2, np.random.default_rng(0))
    update(request, lists)
    assert calls == [lists] and len(request.logprobs) == 0


def test_counter_request_ids_are_unique_and_keep_the_callers_id() -> None:
    def vllm_assign(request):
        raise ValueError("vLLM's check")

    engine = SimpleNamespace(input_processor=SimpleNamespace(assign_request_id=vllm_assign))
    assert vllm_shortcuts.install_counter_request_ids(engine)
    requests = [SimpleNamespace(request_id=name, external_req_id=None) for name in ("a", "b", "a")]
    for request in requests:
        engine.input_processor.assign_request_id(request)
    assert [r.external_req_id for r in requests] == ["a", "b", "a"]
    assert len({r.request_id for r in requests}) == 3 and requests[0].request_id.startswith("a-")
    with pytest.raises(ValueError, match="vLLM's check"):  # an id set by the caller: vLLM's error
        engine.input_processor.assign_request_id(SimpleNamespace(request_id="c", external_req_id="c"))
    assert not vllm_shortcuts.install_counter_request_ids(SimpleNamespace())
