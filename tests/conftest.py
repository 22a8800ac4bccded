"""Shared helpers for the engine tests: writing specs and running the ``hsbench`` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HSBENCH = Path(sys.executable).parent / "hsbench"  # console script of the venv running the tests


@pytest.fixture
def write_spec(tmp_path):
    """Write TOML text to ``tmp_path/specs/<name>.toml`` and return the path."""

    def write(text: str, name: str = "exp") -> Path:
        path = tmp_path / "specs" / f"{name}.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        return path

    return write


def hsbench(*args: str, check_rc: int | None = 0) -> subprocess.CompletedProcess:
    """Run the installed ``hsbench`` command from the repository root; check its exit code."""
    proc = subprocess.run([str(HSBENCH), *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, f"rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def outcomes(results: Path, experiment: str) -> dict[str, tuple]:
    """Run id -> (status, settings, metrics) of every record; fails on an unreadable record."""
    found = {}
    for path in (results / experiment / "runs").iterdir():
        if path.name.startswith("."):
            continue  # temporary file of an interrupted atomic write, never read
        record = json.loads(path.read_text())
        assert path.name == f"{record['id']}.json"
        found[record["id"]] = (record["status"], record["settings"], record["metrics"])
    return found
