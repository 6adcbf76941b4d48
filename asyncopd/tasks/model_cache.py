"""Build-once, share-many caches of model directories (the demo pair, the SmolLM2 pair).

A cache entry is a directory ``<root>/<name>-<digest>`` where ``digest`` hashes
everything that decides its contents, so a changed recipe gets a new entry instead
of a stale one. :func:`build_once` fills an entry exactly once across processes: a
``filelock.FileLock`` next to it lets one caller build while the others wait, the
build goes to a temporary sibling that is renamed into place (a killed build never
leaves a half-written entry), and an entry counts as finished only once its
``manifest.json`` exists.

Callers: :mod:`asyncopd.tasks.demo` and :mod:`asyncopd.tasks.smollm2`. This module
knows nothing about models; the caller's ``build`` function writes the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["MANIFEST", "build_once", "cache_root", "keyed_dir", "remove_leftovers"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
"""Written last by a build; its presence marks a finished entry."""

_LOCK_TIMEOUT_S = 3600.0


def cache_root(cache_dir: str | None) -> Path:
    """``task.cache_dir`` if set, else ``$XDG_CACHE_HOME/asyncopd`` (``~/.cache/asyncopd``)."""
    if cache_dir is not None:
        root = Path(cache_dir)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "asyncopd"
    return root.expanduser()


def keyed_dir(cache_dir: str | None, name: str, key: dict[str, object]) -> Path:
    """``<cache_root>/<name>-<first 12 hex digits of sha256(key as sorted JSON)>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root(cache_dir) / f"{name}-{digest}"


def build_once(final: Path, build: Callable[[Path], None], *, what: str, hint: str = "") -> Path:
    """Return ``final``, first calling ``build(tmp_dir)`` if it holds no finished build.

    ``build`` must write :data:`MANIFEST` into ``tmp_dir`` last. Safe to call from
    many processes at once: one builds, the others wait on the lock (up to an hour)
    and then read the finished entry. ``what`` names the models in log lines and
    errors; ``hint`` is added to the log line that announces a build.
    """
    if (final / MANIFEST).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final) + ".lock")
    logger.info("%s not cached at %s; building them%s (or waiting for the process that is)", what, final, hint)
    try:
        lock.acquire(timeout=_LOCK_TIMEOUT_S)
    except Timeout as exc:
        raise TimeoutError(
            f"waited {_LOCK_TIMEOUT_S:.0f}s for {lock.lock_file} while another process builds the {what}. "
            "Fix: check that process (it logs its progress), or set task.cache_dir to a directory no "
            "other job uses."
        ) from exc
    try:
        if (final / MANIFEST).is_file():  # built by another process while we waited
            return final
        remove_leftovers(final)
        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
            os.rename(tmp, final)  # atomic: readers see no entry or a whole one
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    return final


def remove_leftovers(final: Path) -> None:
    """Delete what killed builds left behind (only called while holding the lock)."""
    for stale in final.parent.glob(final.name + ".tmp-*"):
        logger.warning("removing %s, left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        logger.warning("removing %s: it has no %s, so it is not a finished build", final, MANIFEST)
        shutil.rmtree(final)
