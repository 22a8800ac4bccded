"""``hsbench plot`` writes a one-page HTML report next to the figures: self-contained and complete."""

from __future__ import annotations

import base64
import json
import re

from hsbench.cli import main

SPEC = """
kind = "quadratic"
description = "report test sweep"
[settings]
dim = 5
steps = 30
[grid]
optimizer = ["sgd", "adam"]
[seeds]
count = 2
"""


def test_plot_writes_a_self_contained_report(write_spec, tmp_path, capsys):
    spec = write_spec(SPEC)
    results, plots = tmp_path / "results", tmp_path / "plots"
    assert main(["run", str(spec), "--results", str(results)]) == 0
    assert main(["plot", str(spec), "--results", str(results), "--plots", str(plots)]) == 0
    printed = capsys.readouterr().out.splitlines()
    page = (plots / "exp.html").read_text()
    assert printed[-1] == str(plots / "exp.html")

    pngs = [p for p in map(type(plots), printed) if p.suffix == ".png"]
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert pngs and [base64.b64decode(e) for e in embedded] == [p.read_bytes() for p in pngs]
    assert 'src="http' not in page and "<script" not in page  # opens offline

    assert "report test sweep" in page and "optimizer = [&quot;sgd&quot;, &quot;adam&quot;]" in page  # the spec's text
    record = json.loads(next((results / "exp" / "runs").glob("*.json")).read_text())
    assert record["git_revision"] in page and f"torch {record['versions']['torch']}" in page
    assert f"hsbench run {spec} --scale default --results {results}" in page
    assert f"hsbench check {spec} --scale default --against {results}" in page
    assert "Metrics (mean over seeds, per optimizer)" in page and "<td>ok</td><td>4</td>" in page
