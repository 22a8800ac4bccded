"""``hsbench check``: a fresh run of a spec compared with reference records, run id by run id."""

from __future__ import annotations

import json

import pytest

from hsbench.check import group_of, numbers, relative_difference
from hsbench.cli import main

SPEC = """
kind = "quadratic"
[settings]
dim = 5
steps = 30
[grid]
optimizer = ["sgd", "adam"]
[seeds]
count = 2
"""


@pytest.fixture
def reference(write_spec, tmp_path):
    """A spec of 4 quick runs and a reference folder holding its records."""
    spec = write_spec(SPEC)
    assert main(["run", str(spec), "--results", str(tmp_path / "reference")]) == 0
    return spec, tmp_path / "reference"


def records(results):
    return sorted((results / "exp" / "runs").glob("*.json"))


def check(spec, reference, fresh, *options) -> int:
    return main(["check", str(spec), "--against", str(reference), "--results", str(fresh), *options])


def test_a_rerun_agrees_exactly_with_its_reference(reference, tmp_path, capsys):
    spec, ref = reference
    capsys.readouterr()
    assert check(spec, ref, tmp_path / "fresh") == 0
    out = capsys.readouterr().out
    assert len(records(tmp_path / "fresh")) == 4  # computed, not read from the reference
    lines = [line.split() for line in out.splitlines() if "max rel diff" in line]
    assert lines and all(line[4] == "0.00e+00" and line[-1] == "ok" for line in lines)
    assert "reproduces the reference: 4 runs compared" in out


def test_a_changed_number_fails_its_group_and_the_command(reference, tmp_path, capsys):
    spec, ref = reference
    path = records(ref)[0]
    record = json.loads(path.read_text())
    metric = next(name for name, value in record["metrics"].items() if isinstance(value, float) and value != 0)
    record["metrics"][metric] *= 1 + 1e-4
    path.write_text(json.dumps(record))
    capsys.readouterr()
    assert check(spec, ref, tmp_path / "fresh") == 1
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.split()[0] == group_of(metric)]
    assert "FAIL" in line and f"{record['id']} {metric}" in line
    assert float(line.split()[4]) == pytest.approx(1e-4, rel=1e-3)
    assert "DOES NOT reproduce" in out
    assert check(spec, ref, tmp_path / "fresh", "--rtol", "1e-3") == 0  # within a looser tolerance


def test_runs_missing_on_either_side_are_reported_and_fail(reference, tmp_path, capsys):
    spec, ref = reference
    removed = records(ref)[0]
    removed.unlink()
    capsys.readouterr()
    assert check(spec, ref, tmp_path / "fresh") == 1
    out = capsys.readouterr().out
    assert f"no reference record (1): {removed.stem}" in out and "3 runs compared" in out


def test_check_refuses_the_reference_as_its_fresh_folder(reference, capsys):
    spec, ref = reference
    assert check(spec, ref, ref) == 2
    assert "the reference folder itself" in capsys.readouterr().err


def test_numbers_and_relative_differences():
    assert numbers(3) == [3.0] and numbers([[1, 2], [3.5]]) == [1.0, 2.0, 3.5]
    assert numbers("text") is None and numbers([1, "x"]) is None and numbers(True) is None
    assert relative_difference(1.0, 1.1, 1e-12) == pytest.approx(0.1 / 1.1)
    assert relative_difference(1e-14, 2e-14, 1e-12) == 0.0  # within atol
    assert relative_difference(float("nan"), float("nan"), 0.0) == 0.0
    assert relative_difference(float("nan"), 1.0, 0.0) == float("inf")
    assert group_of("l1/hesscale") == "hesscale" and group_of("norm_diag") == "norm_diag"
