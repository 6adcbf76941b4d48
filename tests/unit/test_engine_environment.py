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


def test_the_per_update_prefix_cache_reset_line_is_dropped_and_its_failure_kept() -> None:
    import logging

    import asyncopd.actor.vllm_setup  # noqa: F401  (installs the filters)

    logger = logging.getLogger("vllm.v1.core.block_pool")

    def record(message: str, *args: object) -> logging.LogRecord:
        return logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, args, None)

    assert not logger.filter(record("Successfully reset prefix cache"))
    assert logger.filter(record("Failed to reset prefix cache because some blocks (%d) are not freed yet", 3))
