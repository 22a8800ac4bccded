"""The command line answers at once: ``--help``, ``list`` and a rejected spec (bad TOML, unknown kind,
setting or scale) import neither torch, numpy, pandas, matplotlib, gymnasium nor submitit (checked in a
fresh interpreter, not timed), because declaring a kind imports none of them (``hsbench.engine.kind``)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from hsbench.experiments import names

REPO = Path(__file__).resolve().parents[1]

HEAVY = ("torch", "numpy", "pandas", "matplotlib", "gymnasium", "submitit")

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


def _imported(args: list[str], cwd: Path, error: str = "") -> tuple[int, list[str]]:
    """Exit code of ``hsbench ARGS`` run in ``cwd`` and the heavy modules it imported; stderr holds ``error``."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], cwd=cwd, capture_output=True, text=True
    )
    assert error in out.stderr
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


def test_list_and_specs_rejected_for_a_setting_or_a_scale_import_no_heavy_module(tmp_path):
    (tmp_path / "experiments").mkdir()
    bad_setting = 'kind = "approx-quality"\n[grid]\nactivation = ["tanh", "softsign"]\n'
    (tmp_path / "experiments" / "bad-setting.toml").write_text(bad_setting)
    assert _imported(["list"], REPO) == (0, [])  # every kind of the committed specs declared and checked
    assert _imported(["run", "figure2", "--scale", "nosuch"], REPO, "scales.nosuch: unknown scale") == (2, [])
    assert _imported(["run", "bad-setting"], tmp_path, "grid.activation[1]: unknown value 'softsign'") == (2, [])
    assert _imported(["list"], tmp_path) == (0, [])  # the spec listed as INVALID


def test_every_kind_is_declared_without_a_heavy_module():
    probe = "import sys; from hsbench.experiments import KINDS; [KINDS[name] for name in KINDS]; "
    probe += f"print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("declared", "registry"),
    [
        (names.ACTIVATIONS, "hsbench.activations:ACTIVATIONS"),
        (names.OPTIMIZERS, "hsbench.optim:OPTIMIZERS"),
        (names.PROBLEMS, "hsbench.problems:PROBLEMS"),
        (names.CLOCKS, "hsbench.timing:CLOCKS"),
    ],
)
def test_the_kinds_choices_are_the_registries_names(declared, registry):
    module, _, attribute = registry.partition(":")
    assert declared == tuple(getattr(importlib.import_module(module), attribute))
