"""The teacher's evaluation references: sampled with an HF teacher (seeded, reproducible,
cut at EOS) or a fake vLLM server, fitted to the actors' model length, and carried by
the TeacherReferences message."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from asyncopd.references import cut_at_eos, fit_for_scoring, generate_with_hf
from asyncopd.tasks.tiny import save_tiny_model
from asyncopd.teacher.http import TeacherServer, TeacherServerError
from asyncopd.teacher.references import generate_with_server
from asyncopd.transport import codec
from asyncopd.types import TeacherReference, TeacherReferences

URL = "http://teacher.test:8000/v1"


def test_cut_at_eos_keeps_the_eos_and_names_the_ending() -> None:
    assert cut_at_eos([5, 6, 1, 0, 0], {1}, 8) == ([5, 6, 1], "stop")
    assert cut_at_eos([5, 6, 7, 8], {1}, 3) == ([5, 6, 7], "length")


def _ref(prompt: int, response: int) -> TeacherReference:
    return TeacherReference(prompt_index=0, prompt_ids=np.arange(3, 3 + prompt, dtype=np.int32),
                            response_ids=np.arange(3, 3 + response, dtype=np.int32), finish_reason="length")


def test_fit_for_scoring_leaves_room_for_the_throwaway_token() -> None:
    fitted = fit_for_scoring([_ref(4, 4), _ref(6, 4), _ref(10, 2)], max_model_len=10)
    assert [r.response_ids.shape[0] for r in fitted] == [4, 3]  # 6 + 3 = 9; the 10-token prompt leaves none


def test_references_travel_as_one_message() -> None:
    message = TeacherReferences(policy_version=0, references=[_ref(2, 3)], skipped_reason=None)
    decoded = codec.decode(codec.encode(message))
    assert decoded.references[0].response_ids.tolist() == [3, 4, 5]
    skipped = codec.decode(codec.encode(TeacherReferences(policy_version=0, references=[], skipped_reason="x")))
    assert skipped.references == [] and skipped.skipped_reason == "x"


def test_hf_references_are_seeded_and_cut_at_eos(tmp_path) -> None:
    path = save_tiny_model(tmp_path / "teacher", seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    prompts = [(i, tokenizer(f"{i}+{2 * i}=", add_special_tokens=False)["input_ids"]) for i in range(6)]
    torch.manual_seed(123)
    first = generate_with_hf(model, tokenizer, prompts, max_new_tokens=12, seed=7, max_batch_tokens=10_000)
    # The caller's stream is untouched (learner rank 0 samples them with a colocated teacher).
    assert torch.equal(torch.rand(4), (torch.manual_seed(123), torch.rand(4))[1])
    again = generate_with_hf(model, tokenizer, prompts, max_new_tokens=12, seed=7, max_batch_tokens=10_000)
    other = generate_with_hf(model, tokenizer, prompts, max_new_tokens=12, seed=8, max_batch_tokens=10_000)
    assert [r.prompt_index for r in first] == list(range(6))
    assert [r.response_ids.tolist() for r in first] == [r.response_ids.tolist() for r in again]
    assert [r.response_ids.tolist() for r in first] != [r.response_ids.tolist() for r in other]
    eos = tokenizer.eos_token_id
    for r, (_, ids) in zip(first, prompts):
        assert r.prompt_ids.tolist() == ids
        tokens = r.response_ids.tolist()
        if r.finish_reason == "stop":
            assert tokens[-1] == eos and eos not in tokens[:-1]
        else:
            assert len(tokens) == 12 and eos not in tokens


def test_server_references_ask_for_neutral_seeded_sampling_and_token_ids() -> None:
    requests = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        requests.append(body)
        # Answer in reverse index order: the client must sort.
        choices = [{"index": i, "text": "", "token_ids": [20 + i, 1] if i % 2 else [30, 31, 32],
                    "finish_reason": "stop" if i % 2 else "length"} for i in range(len(body["prompt"]))][::-1]
        return httpx.Response(200, json={"choices": choices})

    server = TeacherServer(URL, transport=httpx.MockTransport(handler))
    prompts = [(i, [5, 6, 7 + i]) for i in range(3)]
    refs = generate_with_server(server, "teacher", prompts, max_new_tokens=3, seed=4, max_request_tokens=12)
    assert [r.response_ids.tolist() for r in refs] == [[30, 31, 32], [21, 1], [30, 31, 32]]
    assert [r.finish_reason for r in refs] == ["length", "stop", "length"]
    assert [len(b["prompt"]) for b in requests] == [2, 1]  # 12 tokens per request: 2 rows of 3 + 3
    first = requests[0]
    assert first["temperature"] == 1.0 and first["top_k"] == 0 and first["top_p"] == 1.0
    assert first["return_token_ids"] is True and first["max_tokens"] == 3 and first["seed"] == 4


def test_a_server_without_token_ids_is_a_clear_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "hi", "finish_reason": "stop"}]})

    server = TeacherServer(URL, transport=httpx.MockTransport(handler))
    with pytest.raises(TeacherServerError, match="return_token_ids"):
        generate_with_server(server, "teacher", [(0, [5])], max_new_tokens=3, seed=0, max_request_tokens=100)


def test_a_colocated_teacher_publishes_references_the_actors_can_read(tmp_path) -> None:
    """teacher.backend=colocated: learner rank 0 samples the references with its in-process
    teacher and publishes them where teacher rank 0 would; actors read them the same way."""
    import torch.distributed as dist

    from asyncopd.config import from_dict
    from asyncopd.references import publish_hf_references
    from asyncopd.transport.discovery import Rendezvous, read_teacher_references

    path = save_tiny_model(tmp_path / "teacher", seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    cfg = from_dict({"teacher": {"backend": "colocated"}, "cluster": {"teachers": 0},
                     "task": {"num_eval_prompts": 5}, "actor": {"max_new_tokens": 6}})
    rendezvous = Rendezvous(dist.HashStore(), 0, 1, 5.0)
    publish_hf_references(cfg, rendezvous, model, tokenizer, who="learner 0")
    message = read_teacher_references(rendezvous)
    assert message.skipped_reason is None
    assert [r.prompt_index for r in message.references] == list(range(5))
    assert all(1 <= r.response_ids.shape[0] <= 6 for r in message.references)

    off = from_dict({**cfg.to_dict(), "eval": {**cfg.to_dict()["eval"], "teacher_samples": False}})
    publish_hf_references(off, rendezvous, model, tokenizer, who="learner 0")
    assert read_teacher_references(rendezvous).skipped_reason == "eval.teacher_samples=false"
