"""The vllm_http teacher backend against a fake vLLM server (httpx.MockTransport):
request building, prompt_logprobs parsing (sampled token, ranks 1..k, top-k with
student-only ids dropped), batching and concurrency, retries, errors that name the
URL and the fix, model and tokenizer checks, and the config fields."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable

import httpx
import msgspec
import numpy as np
import pytest

from asyncopd.config import ConfigError, TeacherConfig
from asyncopd.tasks.tokenizer import build_char_tokenizer
from asyncopd.teacher import server as teacher_server
from asyncopd.teacher.http import (
    HttpScorer,
    TeacherServer,
    TeacherServerError,
    TeacherServerRefused,
    build_completion_request,
    check_served_tokenizer,
    parse_prompt_logprobs,
    split_by_request_tokens,
)
from asyncopd.types import Rollout

URL = "http://teacher.test:8000/v1"
VOCAB = 40
K = 3


def make_rollout(index: int, prompt: list[int], response: list[int], *, top_k: int = 0) -> Rollout:
    n = len(response)
    rng = np.random.default_rng(index)
    student = (np.stack([rng.choice(VOCAB, top_k, replace=False) for _ in range(n)]).astype(np.int32)
               if top_k else None)
    return Rollout(rollout_id=f"0-{index}", kind="train", batch_index=0, group_id=index, actor_index=0,
                   prompt_ids=np.array(prompt, np.int32), response_ids=np.array(response, np.int32),
                   behaviour_logprobs=np.zeros(n, np.float32), token_policy_versions=np.zeros(n, np.int32),
                   policy_version=0, reward=0.0, finish_reason="length", student_topk_ids=student)


def random_rollouts(num: int, *, top_k: int = 0, seed: int = 0) -> list[Rollout]:
    rng = np.random.default_rng(seed)
    return [make_rollout(i, rng.integers(0, VOCAB, int(rng.integers(1, 6))).tolist(),
                         rng.integers(0, VOCAB, int(rng.integers(1, 9))).tolist(), top_k=top_k) for i in range(num)]


def teacher_logprobs(prefix: list[int]) -> np.ndarray:
    """[VOCAB]: the fake teacher's log-softmax after ``prefix`` (a fixed random function of it)."""
    rng = np.random.default_rng(hash(tuple(prefix)) % 2**32)
    logits = 3.0 * rng.standard_normal(VOCAB)
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def vllm_prompt_logprobs(ids: list[int], k: int, rng: np.random.Generator) -> list[dict | None]:
    """What vLLM answers: null, then per position the actual token and the top-k
    (ranks 1..k), here in a shuffled order."""
    positions: list[dict | None] = [None]
    for i in range(1, len(ids)):
        lp = teacher_logprobs(ids[:i])
        actual = ids[i]
        entries = {actual: {"logprob": float(lp[actual]), "rank": int((lp > lp[actual]).sum()) + 1,
                            "decoded_token": "x"}}
        for rank, token in enumerate(np.argsort(-lp)[:k], start=1):
            entries[int(token)] = {"logprob": float(lp[token]), "rank": rank, "decoded_token": "x"}
        items = list(entries.items())
        rng.shuffle(items)
        positions.append({str(token): value for token, value in items})
    return positions


class FakeVllm:
    """Handles /v1/models, /v1/completions and /tokenize like a vLLM server."""

    def __init__(self, *, models: tuple[str, ...] = ("teacher",), max_model_len: int = 128,
                 fail_first: int = 0, fail_status: int = 503) -> None:
        self.models = models
        self.max_model_len = max_model_len
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._tokenizer = build_char_tokenizer()
        self.tokenize_offset = 0
        """Added to every id /tokenize returns (a different tokenizer)."""

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [
                {"id": name, "object": "model", "max_model_len": self.max_model_len} for name in self.models]})
        if path == "/tokenize":
            body = json.loads(request.content)
            ids = self._tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
            return httpx.Response(200, json={"count": len(ids), "tokens": [i + self.tokenize_offset for i in ids]})
        if path != "/v1/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        body = json.loads(request.content)
        with self._lock:
            self.requests.append(body)
            if len(self.requests) <= self.fail_first:
                return httpx.Response(self.fail_status, json={"error": {"message": "busy", "code": self.fail_status}})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            threading.Event().wait(0.02)  # long enough for concurrent requests to overlap
            k = body["prompt_logprobs"]
            if k > 20:
                return httpx.Response(400, json={"error": {"message": f"Requested prompt logprobs of {k}, which is "
                                                           "greater than max allowed: 20", "code": 400}})
            rng = np.random.default_rng(len(self.requests))
            choices = [{"index": i, "text": "z", "finish_reason": "length",
                        "prompt_logprobs": vllm_prompt_logprobs(ids, k, rng)}
                       for i, ids in enumerate(body["prompt"])]
            rng.shuffle(choices)  # clients must order choices by index
            return httpx.Response(200, json={"object": "text_completion", "model": body["model"], "choices": choices})
        finally:
            with self._lock:
                self.in_flight -= 1


def server_for(handler: Callable[[httpx.Request], httpx.Response], **kwargs) -> TeacherServer:
    return TeacherServer(URL, transport=httpx.MockTransport(handler), **kwargs)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(teacher_server, "_BACKOFF_S", 0.0)


def reference(rollout: Rollout, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sampled log-probs [n], teacher top-k ids [n, k], their log-probs [n, k]) from the dense table."""
    ids = np.concatenate([rollout.prompt_ids, rollout.response_ids]).tolist()
    start = rollout.prompt_ids.shape[0]
    dense = np.stack([teacher_logprobs(ids[:i]) for i in range(start, len(ids))])  # [n, VOCAB]
    sampled = dense[np.arange(len(dense)), rollout.response_ids]
    top = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    return sampled, top, np.take_along_axis(dense, top, 1)


def test_request_holds_prompt_plus_response_ids_and_asks_for_prompt_logprobs() -> None:
    rollouts = [make_rollout(0, [5, 6], [7, 8, 9]), make_rollout(1, [10], [11])]
    body = build_completion_request("teacher", rollouts, top_k=4)
    assert body["prompt"] == [[5, 6, 7, 8, 9], [10, 11]]
    assert body["max_tokens"] == 1 and body["prompt_logprobs"] == 4 and body["model"] == "teacher"
    assert json.loads(json.dumps(body)) == body  # plain JSON: no numpy scalars


def test_requests_are_split_by_token_budget_in_order() -> None:
    rollouts = [make_rollout(i, [1] * 3, [2] * n) for i, n in enumerate([2, 3, 10, 1, 1])]  # 5, 6, 13, 4, 4 tokens
    groups = split_by_request_tokens(rollouts, max_tokens=12)
    assert [[r.rollout_id for r in g] for g in groups] == [["0-0", "0-1"], ["0-2"], ["0-3", "0-4"]]


def test_recorded_vllm_answer_is_parsed() -> None:
    """An answer recorded from vLLM 0.32 (CPU) for prompt [5, 6, 7, 8] with prompt_logprobs=2:
    the actual token comes first, here always outside the top-2 (rank 53, 80, 96)."""
    recorded = [None,
                {"6": {"logprob": -4.607287883758545, "rank": 53, "decoded_token": "3"},
                 "5": {"logprob": -3.831033706665039, "rank": 1, "decoded_token": "2"},
                 "16": {"logprob": -4.199109077453613, "rank": 2, "decoded_token": "d"}},
                {"7": {"logprob": -4.738306999206543, "rank": 80, "decoded_token": "4"},
                 "6": {"logprob": -3.916565179824829, "rank": 1, "decoded_token": "3"},
                 "92": {"logprob": -4.148386478424072, "rank": 2, "decoded_token": "`"}},
                {"8": {"logprob": -4.897367000579834, "rank": 96, "decoded_token": "5"},
                 "7": {"logprob": -4.019965648651123, "rank": 1, "decoded_token": "4"},
                 "87": {"logprob": -4.073580265045166, "rank": 2, "decoded_token": "["}}]
    positions = msgspec.json.decode(json.dumps(recorded).encode(), type=list[teacher_server.PositionLogprobs])
    rollout = make_rollout(0, [5, 6], [7, 8])
    score = parse_prompt_logprobs(positions, rollout, top_k=2)
    np.testing.assert_allclose(score.logprobs, [-4.738306999206543, -4.897367000579834], rtol=0, atol=1e-6)
    assert score.logprobs.dtype == np.float32
    assert score.topk_ids.tolist() == [[6, 92, -1, -1], [7, 87, -1, -1]]
    np.testing.assert_allclose(score.topk_logprobs, [[-3.916565, -4.148386, 0, 0], [-4.019966, -4.073580, 0, 0]],
                               atol=1e-6)
    assert parse_prompt_logprobs(positions, make_rollout(1, [5], [6, 7, 8]), top_k=0).topk_ids is None


@pytest.mark.parametrize("top_k", [0, K])
def test_scores_match_the_dense_teacher(top_k: int) -> None:
    fake = FakeVllm()
    rollouts = random_rollouts(24, top_k=top_k)
    scorer = HttpScorer(server_for(fake), model="teacher", top_k=top_k, max_request_tokens=20, concurrency=3)
    scores = scorer.score(rollouts)
    assert len(fake.requests) > 3 and all(sum(map(len, b["prompt"])) <= 20 or len(b["prompt"]) == 1
                                          for b in fake.requests)
    assert fake.max_in_flight == 3  # http_concurrency requests overlapped
    inside = outside = 0
    for rollout, score in zip(rollouts, scores):
        sampled, top_ids, top_lps = reference(rollout, top_k)
        np.testing.assert_allclose(score.logprobs, sampled, atol=1e-6, rtol=0)
        if not top_k:
            assert score.topk_ids is None and score.topk_logprobs is None
            continue
        n = rollout.response_ids.shape[0]
        assert score.topk_ids.shape == score.topk_logprobs.shape == (n, 2 * top_k)
        assert score.topk_ids.dtype == np.int32 and score.topk_logprobs.dtype == np.float32
        np.testing.assert_array_equal(score.topk_ids[:, :top_k], top_ids)  # rank order
        np.testing.assert_allclose(score.topk_logprobs[:, :top_k], top_lps, atol=1e-6, rtol=0)
        # Student-only ids have no teacher log-prob from the server: dropped.
        assert (score.topk_ids[:, top_k:] == -1).all() and (score.topk_logprobs[:, top_k:] == 0).all()
        in_top = (top_ids == rollout.response_ids[:, None]).any(1)
        inside, outside = inside + int(in_top.sum()), outside + int((~in_top).sum())
    if top_k:
        assert inside and outside, "both the k and the k+1 entry cases must be exercised"
    scorer.close()


def position(entries: dict[int, tuple[float, int]]) -> dict[int, teacher_server._Logprob]:
    return {token: teacher_server._Logprob(logprob=lp, rank=rank) for token, (lp, rank) in entries.items()}


@pytest.mark.parametrize(("positions", "expected"), [
    ([None, None], "a response position has no log-probs"),
    ([None], "1 positions for 2 prompt+response tokens"),
    ([None, position({3: (-1.0, 1), 4: (-2.0, 2)})], "lacks the log-prob of its own token"),
    ([None, position({9: (-1.0, 1)})], "holds 1 entries, expected teacher.top_k=2"),
    ([None, position({9: (-1.0, 1), 3: (-2.0, 3)})], "do not have ranks 1..2"),
    ([None, position({9: (-1.0, 1), 3: (-2.0, None)})], "a top-k entry has no rank"),
])
def test_malformed_prompt_logprobs_are_refused(positions: list, expected: str) -> None:
    rollout = make_rollout(7, [1], [9], top_k=2)
    with pytest.raises(TeacherServerError, match=re.escape(expected)) as info:
        parse_prompt_logprobs(positions, rollout, top_k=2, source=URL)
    assert "rollout 0-7" in str(info.value) and URL in str(info.value) and "Fix:" in str(info.value)


def test_transient_failures_are_retried() -> None:
    fake = FakeVllm(fail_first=2, fail_status=503)
    scorer = HttpScorer(server_for(fake, max_retries=2), model="teacher")
    rollouts = random_rollouts(2)
    scores = scorer.score(rollouts)
    assert len(fake.requests) == 3
    np.testing.assert_allclose(scores[1].logprobs, reference(rollouts[1], 0)[0], atol=1e-6)


def test_retries_run_out_with_the_url_and_fix() -> None:
    calls = []

    def down(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(TeacherServerError, match=rf"POST {URL}/completions failed 3 times, last: ConnectError.*"
                                                 rf"Fix: check that the teacher server is up.*curl {URL}/models"):
        HttpScorer(server_for(down, max_retries=2), model="teacher").score(random_rollouts(1))
    assert len(calls) == 3


@pytest.mark.parametrize(("top_k", "model", "expected"), [
    (21, "teacher", r"refused \(400\): Requested prompt logprobs of 21.*restart the server with --max-logprobs >= 21"),
    (0, "teacher", r"answered 1 choices"),
])
def test_refusals_are_not_retried_and_name_the_fix(top_k: int, model: str, expected: str) -> None:
    fake = FakeVllm()
    rollouts = random_rollouts(2, top_k=top_k)
    if top_k == 0:  # a server that drops a choice
        def handler(request: httpx.Request) -> httpx.Response:
            response = fake(request)
            body = json.loads(response.content)
            body["choices"] = [c for c in body["choices"] if c["index"] == 0]
            return httpx.Response(200, json=body)
    else:
        handler = fake
    with pytest.raises(TeacherServerError, match=expected) as info:
        HttpScorer(server_for(handler, top_k=top_k), model=model, top_k=top_k).score(rollouts)
    assert f"{URL}/completions" in str(info.value)
    assert len(fake.requests) == 1


@pytest.mark.parametrize(("body", "expected"), [
    (b"<html>gateway</html>", "answered a body asyncopd cannot read"),
    (json.dumps({"choices": [{"index": 0, "text": "z"}]}).encode(), "answered no prompt_logprobs"),
])
def test_foreign_answers_name_the_url_and_fix(body: bytes, expected: str) -> None:
    server = server_for(lambda request: httpx.Response(200, content=body))
    with pytest.raises(TeacherServerError, match=expected) as info:
        HttpScorer(server, model="teacher").score(random_rollouts(1))
    assert URL in str(info.value) and "Fix: point teacher.url at a vLLM" in str(info.value)


def test_wrong_path_is_a_404_with_the_fix() -> None:
    server = TeacherServer("http://teacher.test:8000/openai", transport=httpx.MockTransport(FakeVllm()))
    with pytest.raises(TeacherServerRefused, match=r"refused \(404\).*Fix: check teacher.url \(the OpenAI base URL"):
        server.wait_until_up(timeout_s=5)


def test_the_served_model_is_resolved() -> None:
    assert server_for(FakeVllm()).resolve_model(None).id == "teacher"
    two = server_for(FakeVllm(models=("a", "b")))
    assert two.resolve_model("b").id == "b"
    with pytest.raises(TeacherServerError, match=r"serves 2 models \['a', 'b'\]. Fix: set teacher.served_model"):
        two.resolve_model(None)
    with pytest.raises(TeacherServerError, match=r"teacher.served_model='c'.*serves only \['a', 'b'\]"):
        two.resolve_model("c")


def test_the_served_tokenizer_must_match_the_students() -> None:
    tokenizer = build_char_tokenizer()
    fake = FakeVllm()
    check_served_tokenizer(server_for(fake), "teacher", tokenizer)
    fake.tokenize_offset = 1
    with pytest.raises(TeacherServerError, match=r"tokenizes a probe text differently.*first difference at "
                                                 r"token 0.*Fix: serve a teacher from the student's model family"):
        check_served_tokenizer(server_for(fake), "teacher", tokenizer)


def test_rollouts_with_the_wrong_topk_width_are_refused() -> None:
    scorer = HttpScorer(server_for(FakeVllm()), model="teacher", top_k=K)
    with pytest.raises(ValueError, match="carries 2 student top-k ids per token, teacher.top_k=3"):
        scorer.score(random_rollouts(1, top_k=2))


@pytest.mark.parametrize(("fields", "expected"), [
    ({"backend": "vllm_http"}, "teacher.url=None: teacher.backend=vllm_http needs the server's address"),
    ({"backend": "vllm_http", "url": "teacher:8000/v1"}, "teacher.url='teacher:8000/v1': is not an http"),
    ({"url": URL}, "teacher.url='http://teacher.test:8000/v1': is used only by teacher.backend=vllm_http"),
    ({"served_model": "t"}, "teacher.served_model='t': is used only by teacher.backend=vllm_http"),
    ({"backend": "vllm_http", "url": URL, "http_timeout_s": 200.0}, "teacher.http_timeout_s=200.0: exceeds "
                                                                      "teacher.request_timeout_s=120.0"),
    ({"backend": "vllm_http", "url": URL, "http_concurrency": 0}, "teacher.http_concurrency=0: must be > 0"),
])
def test_http_config_is_validated(fields: dict, expected: str) -> None:
    with pytest.raises(ConfigError, match="Fix:") as info:
        TeacherConfig(**fields)
    assert expected in str(info.value)


def test_a_local_teacher_path_with_a_remote_teacher_is_refused() -> None:
    from asyncopd.config import JobConfig, ModelConfig, ModelSpec
    from asyncopd.launch import resolve_model_paths

    cfg = JobConfig(teacher=TeacherConfig(backend="vllm_http", url=URL),
                    model=ModelConfig(teacher=ModelSpec(path="/models/teacher")))
    with pytest.raises(ConfigError, match=r"model.teacher.path='/models/teacher': unused with "
                                          r"teacher.backend=vllm_http.*Fix: remove model.teacher.path"):
        resolve_model_paths(cfg)


def test_the_api_key_comes_from_the_named_variable_and_is_sent_as_a_bearer_token(monkeypatch) -> None:
    seen: list[str | None] = []
    fake = FakeVllm()

    def guarded(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.headers.get("authorization") != "Bearer s3cret":
            return httpx.Response(401, json={"error": "Unauthorized"})
        return fake(request)

    cfg = TeacherConfig(backend="vllm_http", url=URL, api_key_env="TEACHER_KEY")
    monkeypatch.setenv("TEACHER_KEY", "s3cret")
    server = TeacherServer.from_config(cfg, transport=httpx.MockTransport(guarded))
    scores = HttpScorer(server, model="teacher").score(random_rollouts(2))
    assert len(scores) == 2 and seen and set(seen) == {"Bearer s3cret"}

    monkeypatch.setenv("TEACHER_KEY", "wrong")
    wrong = TeacherServer.from_config(cfg, transport=httpx.MockTransport(guarded))
    with pytest.raises(TeacherServerRefused, match=r"refused \(401\).*Fix: the key in \$TEACHER_KEY "
                                                   r"\(teacher.api_key_env\) is not the server's --api-key"):
        wrong.models()
    without = server_for(guarded)
    with pytest.raises(TeacherServerRefused, match=r"refused \(401\).*Fix: the server wants an API key.*set "
                                                   r"teacher.api_key_env"):
        without.models()


@pytest.mark.parametrize("value", [None, "  "])
def test_a_missing_api_key_variable_is_a_startup_error(monkeypatch, value) -> None:
    if value is None:
        monkeypatch.delenv("TEACHER_KEY", raising=False)
    else:
        monkeypatch.setenv("TEACHER_KEY", value)
    cfg = TeacherConfig(backend="vllm_http", url=URL, api_key_env="TEACHER_KEY")
    with pytest.raises(TeacherServerError, match=r"teacher.api_key_env='TEACHER_KEY', but \$TEACHER_KEY is "
                                                 r"(not set|empty).*Fix: export TEACHER_KEY="):
        TeacherServer.from_config(cfg)


def test_the_api_key_variable_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"teacher.api_key_env='sk-abc123': is not an environment variable name"):
        TeacherConfig(backend="vllm_http", url=URL, api_key_env="sk-abc123")
    with pytest.raises(ConfigError, match=r"teacher.api_key_env='K': is used only by teacher.backend=vllm_http"):
        TeacherConfig(api_key_env="K")


# ---- several servers: failover and rejoin ----------------------------------------------------

class Switchable:
    """A FakeVllm that can be taken down (connection refused) and brought back."""

    def __init__(self) -> None:
        self.vllm = FakeVllm()
        self.down = False
        self.calls = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        return self.vllm(request)


def test_a_failed_server_is_skipped_at_once_and_rejoins_when_a_probe_answers() -> None:
    clock = [0.0]
    backends = [Switchable(), Switchable()]
    servers = [TeacherServer(f"http://teacher{j}.test:8000/v1", transport=httpx.MockTransport(b), max_retries=3)
               for j, b in enumerate(backends)]
    scorer = HttpScorer(servers, model="teacher", concurrency=1, clock=lambda: clock[0])
    rollouts = random_rollouts(2)
    scorer.score(rollouts)
    scorer.score(rollouts)
    assert [len(b.vllm.requests) for b in backends] == [1, 1]  # spread over both
    backends[0].down = True
    for _ in range(4):
        scores = scorer.score(rollouts)
        np.testing.assert_allclose(scores[1].logprobs, reference(rollouts[1], 0)[0], atol=1e-6)
    assert scorer.health.silent() == [0]
    assert backends[0].calls == 1 + 1  # one failed request (no retries with backoff), then skipped
    assert len(backends[1].vllm.requests) == 1 + 4
    backends[0].down = False
    clock[0] += 4.0
    scorer.score(rollouts)
    assert scorer.health.silent() == [0]  # not probed again yet
    clock[0] += 1.5
    scorer.score(rollouts)
    scorer.score(rollouts)
    assert scorer.health.silent() == [] and scorer.health.num_rejoined == 1
    assert len(backends[0].vllm.requests) >= 2  # it gets requests again


def test_only_when_every_server_failed_does_a_batch_fail() -> None:
    backends = [Switchable(), Switchable()]
    for b in backends:
        b.down = True
    servers = [TeacherServer(f"http://teacher{j}.test:8000/v1", transport=httpx.MockTransport(b), max_retries=1)
               for j, b in enumerate(backends)]
    with pytest.raises(TeacherServerError, match=r"teacher1.test:8000/v1/completions failed 2 times"):
        HttpScorer(servers, model="teacher").score(random_rollouts(1))
    assert [b.calls for b in backends] == [1, 2]  # the first fails over at once; the last one retries


def test_teacher_url_takes_a_list_of_servers() -> None:
    from asyncopd.config import ConfigError, TeacherConfig

    cfg = TeacherConfig(backend="vllm_http", url=["http://a:8000/v1", "http://b:8000/v1"])
    assert cfg.urls == ["http://a:8000/v1", "http://b:8000/v1"]
    assert TeacherConfig(backend="vllm_http", url="http://a:8000/v1").urls == ["http://a:8000/v1"]
    with pytest.raises(ConfigError, match="teacher.url='ftp://b'.*not an http"):
        TeacherConfig(backend="vllm_http", url=["http://a:8000/v1", "ftp://b"])
    with pytest.raises(ConfigError, match="teacher.url=\\[\\].*empty list"):
        TeacherConfig(backend="vllm_http", url=[])
