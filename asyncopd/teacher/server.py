"""A client of one OpenAI-compatible vLLM server: requests with retries, typed answers.

:class:`TeacherServer` sends the requests of teacher.backend=vllm_http
(:mod:`asyncopd.teacher.http` scores with it; the launcher checks the served
tokenizer with it). Connection errors, timeouts and 5xx/429 answers are retried
with backoff; a 4xx answer is a :class:`TeacherServerRefused` and a malformed body a
:class:`TeacherServerError`, both naming the URL and the fix. The msgspec structs
below type the parts of vLLM's answers that asyncopd reads.

This module does not score, choose between servers or read config files.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import httpx
import msgspec

from asyncopd.config import TeacherConfig

__all__ = ["PositionLogprobs", "TeacherServer", "TeacherServerError", "TeacherServerRefused", "api_key_from_env"]

logger = logging.getLogger(__name__)

_BACKOFF_S = 0.5
"""First retry delay; doubled on every further retry."""
_PROBE_TIMEOUT_S = 2.0



class TeacherServerError(RuntimeError):
    """The teacher server failed a request or answered something unusable; the
    message names the URL and the fix."""


class TeacherServerRefused(TeacherServerError):
    """A 4xx answer: resending the same request cannot help."""


class _Logprob(msgspec.Struct):
    logprob: float
    rank: int | None = None


PositionLogprobs = dict[int, _Logprob] | None
"""One prompt position of vLLM's ``prompt_logprobs``: token id -> log-prob and rank."""


class _Choice(msgspec.Struct):
    index: int
    prompt_logprobs: list[PositionLogprobs] | None = None
    token_ids: list[int] | None = None
    """Generated ids, with ``return_token_ids`` (teacher samples for the evaluation)."""
    finish_reason: str | None = None


class _Completion(msgspec.Struct):
    choices: list[_Choice]


class _Model(msgspec.Struct):
    id: str
    max_model_len: int | None = None


class _ModelList(msgspec.Struct):
    data: list[_Model]


class _Tokenized(msgspec.Struct):
    tokens: list[int]


def _fix_for(status: int, message: str, top_k: int, key_env: str | None = None) -> str:
    """The remedy for a refused request, from vLLM's error text."""
    lowered = message.lower()
    if "logprobs" in lowered and "max allowed" in lowered:
        return f"restart the server with --max-logprobs >= {top_k} (teacher.top_k)"
    if "out of vocabulary" in lowered:
        return "serve a teacher that shares the student's tokenizer"
    if "context length" in lowered or "max_model_len" in lowered or "longer than" in lowered:
        return "restart the server with --max-model-len >= actor.max_model_len"
    if status == 404:
        return ("check teacher.url (the OpenAI base URL, ending in /v1) and teacher.served_model "
                "(GET <url>/models lists the served names)")
    if status in (401, 403):
        if key_env is None:
            return ("the server wants an API key (vllm serve --api-key): export it in a variable on the teacher "
                    "nodes and set teacher.api_key_env to that variable's name")
        return f"the key in ${key_env} (teacher.api_key_env) is not the server's --api-key; export the right one"
    return "check teacher.url and teacher.served_model against the server"


class TeacherServer:
    """A small client of one vLLM OpenAI-compatible server, with retries."""

    def __init__(self, url: str, *, timeout_s: float = 60.0, max_retries: int = 3, concurrency: int = 4,
                 top_k: int = 0, api_key: str | None = None, api_key_env: str | None = None,
                 transport: httpx.BaseTransport | None = None) -> None:
        """``url``: the OpenAI base URL (".../v1"); ``top_k`` only shapes error hints;
        ``api_key``: sent as a bearer token (``api_key_env``, the variable it came from,
        names it in errors); ``transport``: an httpx transport (tests pass
        ``httpx.MockTransport``)."""
        self.url = url.rstrip("/")
        self.root = self.url.removesuffix("/v1")
        """Where vLLM's non-OpenAI routes (/tokenize) live."""
        self.max_retries = max_retries
        self.top_k = top_k
        self.api_key_env = api_key_env if api_key else None
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._client = httpx.Client(timeout=timeout_s, limits=limits, headers=headers, transport=transport)

    @classmethod
    def from_config(cls, cfg: TeacherConfig, *, url: str | None = None,
                    transport: httpx.BaseTransport | None = None) -> TeacherServer:
        """The client of ``url`` (default: the first of teacher.url), with the teacher.http_*
        settings and teacher.api_key_env."""
        assert cfg.urls, "TeacherConfig validation requires teacher.url with vllm_http"
        return cls(url or cfg.urls[0], timeout_s=cfg.http_timeout_s, max_retries=cfg.http_max_retries,
                   concurrency=cfg.http_concurrency, top_k=cfg.top_k,
                   api_key=api_key_from_env(cfg.api_key_env), api_key_env=cfg.api_key_env, transport=transport)

    def __enter__(self) -> TeacherServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, url: str, payload: dict[str, Any] | None = None, *,
                retries: int | None = None, timeout_s: float | None = None) -> bytes:
        """The body of a 2xx answer; retries transport errors, 5xx and 429 with backoff."""
        retries = self.max_retries if retries is None else retries
        timeout = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        for attempt in range(retries + 1):
            try:
                response = self._client.request(method, url, json=payload, timeout=timeout)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    return response.content
                if response.status_code != 429 and response.status_code < 500:
                    message = _error_message(response)
                    raise TeacherServerRefused(
                        f"{method} {url} was refused ({response.status_code}): {message}. "
                        f"Fix: {_fix_for(response.status_code, message, self.top_k, self.api_key_env)}.")
                problem = f"HTTP {response.status_code}: {_error_message(response)}"
            if attempt < retries:
                delay = _BACKOFF_S * 2**attempt
                logger.warning("%s %s failed (%s); retry %d/%d in %.1f s", method, url, problem, attempt + 1,
                               retries, delay)
                time.sleep(delay)
        raise TeacherServerError(
            f"{method} {url} failed {retries + 1} times, last: {problem}. Fix: check that the teacher server is "
            f"up and reachable from this node (curl {self.url}/models) and not overloaded (lower "
            "teacher.http_concurrency or raise teacher.http_timeout_s).")

    def decode(self, body: bytes, into: type, url: str) -> Any:
        try:
            return msgspec.json.decode(body, type=into)
        except msgspec.DecodeError as exc:
            raise TeacherServerError(
                f"{url} answered a body asyncopd cannot read ({exc}; starts {body[:200]!r}). Fix: point teacher.url "
                "at a vLLM OpenAI-compatible server (`vllm serve`), whose completions return prompt_logprobs."
            ) from None

    def wait_until_up(self, timeout_s: float) -> None:
        """Poll GET <url>/models until the server answers (it may still be loading)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.request("GET", f"{self.url}/models", retries=0)
                return
            except TeacherServerRefused:
                raise  # the server is up and says no: waiting cannot help
            except TeacherServerError as exc:
                if time.monotonic() > deadline:
                    raise TeacherServerError(f"the teacher server at {self.url} is not ready after {timeout_s:.0f} s"
                                             f": {exc}") from None
            logger.info("waiting for the teacher server at %s", self.url)
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.0)))

    def probe(self) -> bool:
        """Whether the server answers GET <url>/models now (no retry, short timeout)."""
        try:
            self.request("GET", f"{self.url}/models", retries=0, timeout_s=_PROBE_TIMEOUT_S)
            return True
        except TeacherServerError:
            return False

    def models(self) -> list[_Model]:
        url = f"{self.url}/models"
        return self.decode(self.request("GET", url), _ModelList, url).data

    def resolve_model(self, served_model: str | None) -> _Model:
        """The served model to request: ``served_model``, or the server's only one."""
        models = self.models()
        names = [m.id for m in models]
        if served_model is None and len(models) == 1:
            return models[0]
        if served_model is None:
            raise TeacherServerError(f"the server at {self.url} serves {len(models)} models {names}. Fix: set "
                                     "teacher.served_model to the teacher's name.")
        for model in models:
            if model.id == served_model:
                return model
        raise TeacherServerError(f"teacher.served_model={served_model!r}: the server at {self.url} serves only "
                                 f"{names}. Fix: use one of those names.")

    def tokenize(self, model: str, text: str) -> list[int]:
        url = f"{self.root}/tokenize"
        body = self.request("POST", url, {"model": model, "prompt": text, "add_special_tokens": False})
        return self.decode(body, _Tokenized, url).tokens

    def complete(self, payload: dict[str, Any], *, retries: int | None = None) -> list[_Choice]:
        """POST <url>/completions; the choices in prompt order."""
        url = f"{self.url}/completions"
        choices = sorted(self.decode(self.request("POST", url, payload, retries=retries), _Completion, url).choices,
                         key=lambda c: c.index)
        if [c.index for c in choices] != list(range(len(payload["prompt"]))):
            raise TeacherServerError(f"{url} answered {len(choices)} choices for {len(payload['prompt'])} prompts. "
                                     "Fix: point teacher.url at a vLLM OpenAI-compatible server.")
        return choices


def _error_message(response: httpx.Response) -> str:
    """vLLM's {"error": {"message": ...}}, FastAPI's {"detail": ...}, or the raw text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])[:300]
        if "detail" in body:
            return str(body["detail"])[:300]
    return str(body)[:300]


def api_key_from_env(name: str | None) -> str | None:
    """The key in the environment variable ``name`` (teacher.api_key_env); None when unset."""
    if name is None:
        return None
    key = os.environ.get(name, "").strip()
    if not key:
        raise TeacherServerError(
            f"teacher.api_key_env={name!r}, but ${name} is {'empty' if name in os.environ else 'not set'} on this "
            f"node. Fix: export {name}=<the server's --api-key> before launching (on every node running a teacher "
            "rank), or drop teacher.api_key_env if the server needs no key.")
    return key
