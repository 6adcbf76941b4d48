"""Fixtures shared by the whole-job integration tests."""

from __future__ import annotations

import pytest

from _jobs import save_tiny_pair


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[str, str]:
    """(student, teacher): the tiny random pair, built once per test module."""
    return save_tiny_pair(tmp_path_factory.mktemp("models"))
