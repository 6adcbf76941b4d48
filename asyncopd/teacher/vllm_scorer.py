"""teacher.backend=vllm: score with a vLLM engine held in the teacher process.

:class:`VllmScorer` submits each rollout's prompt+response as a token prompt with
``prompt_logprobs=k`` and ``max_tokens=1`` (the generated token is ignored), steps
the engine until all are done, and reads the response span exactly as the HTTP
backend does (:func:`asyncopd.teacher.http.parse_prompt_logprobs`): the log-prob of
every response token and, with top-k, the teacher's own top-k (vLLM reports
nothing about the student's ids outside it, so those are -1 padding, as with
vllm_http). vLLM batches the prefills itself (continuous batching, chunked
prefill), so the worker's token budget is only how much it hands over at once.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the
launcher), on the CPU build as on CUDA; on GPU it takes its placement's GPUs
(tensor parallel over ``cluster.gpus_per_teacher``) and memory share.

This module does no networking and never imports another role.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from asyncopd.placement import RankPlacement, vllm_device_args
from asyncopd.teacher.http import parse_prompt_logprobs
from asyncopd.teacher.scorer import TeacherScore, check_topk_width
from asyncopd.types import Rollout

__all__ = ["VllmScorer"]

logger = logging.getLogger(__name__)


class VllmScorer:
    """Teacher log-probs from an in-process vLLM engine's ``prompt_logprobs``."""

    def __init__(self, model_path: str, *, dtype: str = "float32", top_k: int = 0, max_model_len: int = 2048,
                 kv_cache_gib: float = 0.25, enforce_eager: bool = True, placement: RankPlacement | None = None,
                 seed: int = 0) -> None:
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        start = time.perf_counter()
        args = EngineArgs(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                          enforce_eager=enforce_eager, max_logprobs=max(top_k, 1), disable_log_stats=True,
                          # Scoring never reuses a prefix; prompt log-probs need every position computed.
                          enable_prefix_caching=False,
                          **vllm_device_args(placement, kv_cache_gib=kv_cache_gib))
        self._engine = LLMEngine.from_engine_args(args)
        self.vocab_size = int(self._engine.model_config.get_vocab_size())
        if not 0 <= top_k <= self.vocab_size:
            raise ValueError(f"teacher.top_k={top_k}: must be in [0, {self.vocab_size}] (the teacher's "
                             f"vocabulary size). Fix: set teacher.top_k to at most {self.vocab_size}.")
        self.top_k = top_k
        self.max_model_len = max_model_len
        self._seq = 0
        logger.info("vLLM teacher %s ready in %.1f s", model_path, time.perf_counter() - start)

    def score(self, rollouts: Sequence[Rollout]) -> list[TeacherScore]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not rollouts:
            return []
        for r in rollouts:
            self._check(r)
        ids: dict[str, int] = {}
        for row, r in enumerate(rollouts):
            request_id = f"score-{self._seq}"
            self._seq += 1
            ids[request_id] = row
            tokens = [int(t) for t in r.prompt_ids] + [int(t) for t in r.response_ids]
            params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=self.top_k, detokenize=False)
            self._engine.add_request(request_id, TokensPrompt(prompt_token_ids=tokens), params)
        positions: dict[int, Any] = {}
        try:
            while self._engine.has_unfinished_requests():
                for output in self._engine.step():
                    if output.finished and output.request_id in ids:
                        positions[ids[output.request_id]] = output.prompt_logprobs
        except BaseException:
            self._engine.abort_request(list(ids))
            raise
        return [parse_prompt_logprobs(positions[row], r, self.top_k, source="the teacher's vLLM engine")
                for row, r in enumerate(rollouts)]

    def _check(self, r: Rollout) -> None:
        if r.num_tokens + 1 > self.max_model_len:  # + the one token vLLM must generate
            raise ValueError(f"rollout {r.rollout_id} has {r.num_tokens} tokens, too many for the teacher engine's "
                             f"max_model_len={self.max_model_len} (actor.max_model_len + 1)")
        if r.num_tokens and int(max(r.prompt_ids.max(initial=0), r.response_ids.max(initial=0))) >= self.vocab_size:
            raise ValueError(f"rollout {r.rollout_id} has a token id outside the teacher's vocabulary "
                             f"({self.vocab_size}); teacher and student must share a tokenizer")
        check_topk_width(r, self.top_k)

    def close(self) -> None:
        self._engine.engine_core.shutdown()
