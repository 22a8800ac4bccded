"""Provenance stored with every record: library versions and the git revision of the code."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("hsbench", "torch", "numpy", "backpack-for-pytorch")


@functools.cache
def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that shape results (absent ones are skipped)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


@functools.cache
def git_revision() -> str:
    """Commit of the hsbench checkout, suffixed ``+dirty`` with uncommitted changes; ``unknown`` outside git."""
    repo = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "hsbench").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")
