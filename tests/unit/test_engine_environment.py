"""What the launcher sets before an actor's vLLM engine is built (CPU machines)."""

from __future__ import annotations

import pytest
import torch

from asyncopd.actor.engine import engine_environment
from asyncopd.config import from_dict

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU engine's variables")


def test_the_onednn_kernel_cache_is_bounded_by_default() -> None:
    cfg = from_dict({})
    env = engine_environment(2, onednn_cache_capacity=cfg.actor.onednn_cache_capacity)
    assert env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "512"
    assert env["OMP_NUM_THREADS"] == "2"
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_none_leaves_onednn_at_its_own_default() -> None:
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in engine_environment(1)
    assert engine_environment(1, onednn_cache_capacity=0)["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "0"


def test_a_negative_capacity_is_refused_with_the_fix() -> None:
    with pytest.raises(Exception, match=r"actor\.onednn_cache_capacity=-1: must be >= 0"):
        from_dict({"actor": {"onednn_cache_capacity": -1}})
