"""The command line answers at once: ``--help`` and a spec rejected before its kind is needed
import neither torch, pandas, matplotlib nor submitit (checked in a fresh interpreter, not timed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "pandas", "matplotlib", "submitit")

PROBE = """
import sys
from hsbench.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:  # --help exits through argparse
    code = e.code
heavy = [m for m in {heavy!r} if m in sys.modules]
print("heavy:", ",".join(heavy))
sys.exit(code)
"""


def _imported(args: list[str], cwd: Path) -> tuple[int, list[str]]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=cwd, capture_output=True, text=True
    )
    line = next(line for line in out.stdout.splitlines() if line.startswith("heavy:"))
    return out.returncode, [m for m in line.removeprefix("heavy:").strip().split(",") if m]


def test_import_of_the_cli_imports_no_heavy_module(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", f"import sys, hsbench.cli; print([m for m in {HEAVY!r} if m in sys.modules])"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_help_and_rejected_specs_import_no_heavy_module(tmp_path):
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "cubic.toml").write_text('kind = "cubic"\n')
    (tmp_path / "experiments" / "broken.toml").write_text("kind = \n")
    for args, code in (
        (["--help"], 0),
        (["run", "--help"], 0),
        (["export", "--help"], 0),
        (["run", "nonexistent"], 2),
        (["status", "cubic"], 2),  # unknown kind
        (["plot", "broken"], 2),  # not TOML
    ):
        assert _imported(args, tmp_path) == (code, []), args
