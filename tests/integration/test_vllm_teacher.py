"""teacher.backend=vllm: the in-process vLLM scorer agrees with the HF scorer (vLLM's CPU build)."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from asyncopd.actor.engine import engine_environment
from asyncopd.tasks.tiny import save_tiny_model
from asyncopd.teacher.scorer import HFScorer

pytestmark = pytest.mark.integration

TOP_K = 5
MAX_MODEL_LEN = 64


def _http_helpers():
    spec = importlib.util.spec_from_file_location("_asyncopd_http_teacher_helpers",
                                                  Path(__file__).with_name("test_http_teacher.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


http_helpers = _http_helpers()
rollouts = http_helpers.rollouts


@pytest.fixture(scope="module")
def scorers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    from asyncopd.teacher.vllm_scorer import VllmScorer

    # head_dim = 64 / 2 = 32: vLLM's CPU attention supports no head_dim below 32.
    path = save_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=3, hidden_size=64, num_heads=2,
                           num_kv_heads=1)
    threads_before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in engine_environment(threads=1).items():
            mp.setenv(key, value)
        vllm_scorer = VllmScorer(str(path), top_k=TOP_K, max_model_len=MAX_MODEL_LEN, kv_cache_gib=0.0625)
    yield vllm_scorer, path
    vllm_scorer.close()
    torch.set_num_threads(threads_before)


@pytest.mark.parametrize("top_k", [0, TOP_K])
def test_vllm_scores_match_hf(scorers: tuple, top_k: int) -> None:
    vllm_scorer, path = scorers
    vllm_scorer.top_k = top_k  # one engine (max_logprobs=TOP_K) serves both widths
    batch = rollouts(24, top_k=top_k, seed=top_k)
    got = vllm_scorer.score(batch)
    want = HFScorer(str(path), top_k=top_k).score(batch)
    http_helpers.assert_scores_match_hf(batch, got, want, top_k)
    for vllm_score in got if top_k else ():
        assert (vllm_score.topk_ids[:, top_k:] == -1).all()  # student-only ids: not reported by vLLM


def test_overlong_rollout_is_refused_with_the_limit(scorers: tuple) -> None:
    vllm_scorer, _ = scorers
    long = rollouts(1, top_k=vllm_scorer.top_k)[0]
    long = type(long)(**{**{f: getattr(long, f) for f in long.__struct_fields__},
                         "prompt_ids": np.arange(3, 3 + MAX_MODEL_LEN, dtype=np.int32) % 90 + 3})
    with pytest.raises(ValueError, match=r"too many for the teacher engine's max_model_len=64"):
        vllm_scorer.score([long])
