"""asyncopd.tasks.model_cache: keyed directories, build once, no half-written entries."""

from __future__ import annotations

from pathlib import Path

import pytest

from asyncopd.tasks.model_cache import MANIFEST, build_once, keyed_dir


def test_keyed_dir_depends_on_key_not_on_key_order(tmp_path: Path) -> None:
    a = keyed_dir(str(tmp_path), "pair", {"x": 1, "y": 2})
    assert a == keyed_dir(str(tmp_path), "pair", {"y": 2, "x": 1})
    assert a != keyed_dir(str(tmp_path), "pair", {"x": 1, "y": 3})
    assert a.parent == tmp_path and a.name.startswith("pair-") and len(a.name) == len("pair-") + 12


def test_build_once_builds_then_reuses(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(out: Path) -> None:
        calls.append(out)
        (out / "weights").write_text("w")
        (out / MANIFEST).write_text("{}")

    final = tmp_path / "entry"
    assert build_once(final, build, what="test models") == final
    assert build_once(final, build, what="test models") == final
    assert len(calls) == 1 and (final / "weights").read_text() == "w"
    assert not list(tmp_path.glob("entry.tmp-*"))


def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    def build(out: Path) -> None:
        (out / "half").write_text("x")
        raise RuntimeError("killed")

    final = tmp_path / "entry"
    with pytest.raises(RuntimeError, match="killed"):
        build_once(final, build, what="test models")
    assert not final.exists() and not list(tmp_path.glob("entry.tmp-*"))
