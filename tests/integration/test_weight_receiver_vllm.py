"""Weights learner -> actor through the vLLM worker extension, end to end on vLLM's CPU build.

A thread plays learner rank 0 (member 0 of the weight group, gloo) and streams a
perturbed student in small buckets; the engine's worker receives them itself
(asyncopd.actor.weight_receiver) and must then sample exactly like an HF model
holding the new weights. The tied lm_head is not sent (the receiver adds it from
the embedding, as vLLM's CPU build needs). A bad plan is refused before anything
is received, and the engine keeps serving.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from asyncopd.actor.engine import VllmEngine, WeightPayloadError, engine_environment
from asyncopd.config import ActorConfig
from asyncopd.tasks.tiny import save_tiny_model
from asyncopd.transport.weights import WeightGroup, broadcast_weights, connect_store, plan_buckets
from asyncopd.types import TensorSpec, WeightUpdate

pytestmark = pytest.mark.integration


def _helpers():
    spec = importlib.util.spec_from_file_location("_asyncopd_actor_engine_helpers",
                                                  Path(__file__).with_name("test_actor_engine.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


helpers = _helpers()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    path = save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0, hidden_size=64, num_heads=2,
                           num_kv_heads=1)
    cfg = ActorConfig(max_new_tokens=helpers.MAX_NEW_TOKENS, max_model_len=48, max_num_seqs=16,
                      temperature=helpers.TEMPERATURE, kv_cache_gib=0.0625)
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=60))
    prefix = f"test/{uuid.uuid4().hex}"
    threads_before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in engine_environment(threads=1).items():
            mp.setenv(key, value)
        engine = VllmEngine(str(path), cfg, seed=0, top_k=0)
    learner: dict = {}
    joiner = threading.Thread(target=lambda: learner.update(
        group=WeightGroup(connect_store("127.0.0.1", server.port, 60), 0, 2, 60.0, prefix=prefix)))
    joiner.start()
    engine.join_weight_group("127.0.0.1", server.port, prefix, 1, 2, 60.0, "gloo")
    joiner.join(timeout=60)
    reference = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    yield {"engine": engine, "group": learner["group"], "reference": reference}
    engine.shutdown()
    torch.set_num_threads(threads_before)


def _send(setup: dict, model, policy_version: int, bucket_bytes: int = 4096) -> float:
    """Learner side in a thread (HF names without the tied lm_head), actor side here."""
    tensors = [(name, p.detach()) for name, p in model.named_parameters()]
    specs = [TensorSpec(name, tuple(t.shape), "float32") for name, t in tensors]
    update = WeightUpdate(policy_version=policy_version, buckets=plan_buckets(specs, bucket_bytes))
    assert len(update.buckets) > 3  # several buckets really travel
    sender = threading.Thread(target=broadcast_weights, args=(setup["group"], update, iter(tensors)))
    sender.start()
    seconds = setup["engine"].receive_weights(update)
    sender.join(timeout=60)
    assert not sender.is_alive()
    return seconds


def test_streamed_weights_become_the_policy(setup: dict) -> None:
    engine, old = setup["engine"], setup["reference"]
    new = helpers.perturbed(old, seed=21)
    assert "lm_head.weight" not in dict(new.named_parameters())  # tied: not sent
    seconds = _send(setup, new, policy_version=1)
    assert 0 < seconds < 30
    batch = helpers.prompts(6, seed=4)
    max_change = 0.0
    for prompt, completion in zip(batch, helpers.generate(engine, batch, "recv", seed=50, policy_version=1)):
        np.testing.assert_allclose(completion.logprobs, helpers.hf_logprobs(new, prompt, completion.token_ids),
                                   atol=1e-3, rtol=0)
        stale = helpers.hf_logprobs(old, prompt, completion.token_ids)
        max_change = max(max_change, float(np.abs(completion.logprobs - stale).max()))
    assert max_change > 1e-2, "the engine still samples from the old weights"
    setup["reference"] = new


def test_bad_plan_is_refused_before_receiving_and_engine_survives(setup: dict) -> None:
    engine, current = setup["engine"], setup["reference"]
    specs = [TensorSpec(name, tuple(p.shape), "float32") for name, p in current.named_parameters()]
    specs[1] = TensorSpec(specs[1].name, (7, 7), "float32")
    update = WeightUpdate(policy_version=2, buckets=plan_buckets(specs, 4096))
    with pytest.raises(WeightPayloadError, match=rf"'{specs[1].name}' has shape \(7, 7\)"):
        engine.receive_weights(update)
    prompt = helpers.prompts(1, seed=5)[0]
    completion = helpers.generate(engine, [prompt], "after", seed=7, policy_version=1)[0]
    np.testing.assert_allclose(completion.logprobs, helpers.hf_logprobs(current, prompt, completion.token_ids),
                               atol=1e-3, rtol=0)
