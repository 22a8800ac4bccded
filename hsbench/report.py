"""One-page HTML report of an experiment, written by ``hsbench plot`` next to its figures.

The page holds what a reader needs to judge and redo the experiment, offline and in one file:
the figures (PNG embedded as data URIs; other files linked relative to the page), the kind's
tables (its CSV files as HTML tables, its Markdown files as text), the runs' statuses, the spec's
text, the library versions and git revisions of the stored runs and of the drawing, and the
commands that rerun, redraw and check it.
"""

from __future__ import annotations

import base64
import collections
import html
import json
import os
import shlex
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsbench.engine.provenance import versions

if TYPE_CHECKING:
    import pandas as pd

    from hsbench.engine.spec import Spec

STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: right; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
"""


def write(
    spec: Spec,
    scale: str,
    df: pd.DataFrame,
    outputs: Iterable[Path],
    outdir: Path,
    results: Path,
    run_versions: Iterable[dict[str, Any]],
) -> Path:
    """Write ``outdir/<experiment>.html`` from the stored results ``df`` and the plot's ``outputs``; return its path.

    ``run_versions`` are the ``versions`` of the stored records (their distinct values are listed).
    """
    import pandas as pd

    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{spec.name}.html"
    parts = [
        f"<h1>{_e(spec.name)} <small>(scale {_e(scale)})</small></h1>",
        f"<p>{_e(spec.description)}</p>",
        f"<p>Kind <code>{_e(spec.kind.name)}</code>: {_e(spec.kind.description)}.</p>",
    ]
    for output in outputs:
        if output.suffix == ".png":
            data = base64.b64encode(output.read_bytes()).decode()
            parts.append(f'<h2>{_e(output.name)}</h2><img alt="{_e(output.name)}" src="data:image/png;base64,{data}">')
        elif output.suffix == ".csv":
            table = pd.read_csv(output).to_html(index=False, na_rep="", float_format=lambda x: f"{x:.4g}")
            parts.append(f"<h2>{_e(output.name)}</h2>{table}")
        elif output.suffix == ".md":
            parts.append(f"<h2>{_e(output.name)}</h2><pre>{_e(output.read_text())}</pre>")
        else:
            parts.append(f'<p>Also: <a href="{_e(os.path.relpath(output, outdir))}">{_e(output.name)}</a></p>')

    parts += _metric_summary(spec, scale, df)
    statuses = collections.Counter(df["status"])
    parts.append("<h2>Runs</h2>")
    parts.append(_table(["status", "runs"], sorted(statuses.items())))
    parts.append(
        f"<p>Total run time {df['wall_time_s'].sum():.1f} s; devices: {_e(', '.join(sorted(set(df['device']))))}.</p>"
    )

    parts.append(f"<h2>Spec</h2><p><code>{_e(spec.path)}</code></p><pre>{_e(spec.path.read_text())}</pre>")

    revisions = collections.Counter(df["git_revision"])
    distinct = collections.Counter(json.dumps(v, sort_keys=True) for v in run_versions)
    parts.append("<h2>Provenance</h2><p>Git revisions of the stored runs:</p>")
    parts.append(_table(["git revision", "runs"], revisions.most_common()))
    parts.append("<p>Library versions of the stored runs:</p>")
    parts.append(
        _table(
            ["versions", "runs"],
            [(", ".join(f"{k} {v}" for k, v in json.loads(d).items()), n) for d, n in distinct.most_common()],
        )
    )
    drawn = ", ".join(f"{k} {v}" for k, v in (versions() | {"matplotlib": metadata.version("matplotlib")}).items())
    parts.append(f"<p>Drawn with {_e(drawn)}.</p>")

    where = f"{shlex.quote(str(spec.path))} --scale {shlex.quote(scale)} --results {shlex.quote(str(results))}"
    commands = [
        f"hsbench run {where}                  # the missing runs (stored runs are reused)",
        f"hsbench plot {where} --plots {shlex.quote(str(outdir if scale == 'default' else outdir.parent))}",
        f"hsbench check {shlex.quote(str(spec.path))} --scale {shlex.quote(scale)} "
        f"--against {shlex.quote(str(results))}   # recompute into a fresh folder and compare",
    ]
    parts.append(f"<h2>Rerun</h2><pre>{_e(chr(10).join(commands))}</pre>")

    page = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(spec.name)} ({_e(scale)})</title>'
        f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    path.write_text(page)
    return path


def _metric_summary(spec: Spec, scale: str, df: pd.DataFrame) -> list[str]:
    """Mean of every scalar numeric metric over the runs that finished ok, per point of the grid."""
    ok = df[df["status"] == "ok"]
    skip = set(spec.kind.fields) | {"seed", "wall_time_s"}
    metrics = [c for c in ok.columns if c not in skip and ok[c].dtype.kind in "if"]
    if ok.empty or not metrics:
        return []
    axes = [axis for axis in spec.resolve(scale).grid if axis in ok.columns and axis != "seed"]
    table = ok.groupby(axes)[metrics].mean().T if axes else ok[metrics].agg(["mean", "std", "min", "max"]).T
    title = f"mean over seeds, per {', '.join(axes)}" if axes else f"over {len(ok)} runs"
    return [f"<h2>Metrics ({_e(title)})</h2>", table.to_html(float_format=lambda x: f"{x:.4g}")]


def _e(text: object) -> str:
    return html.escape(str(text))


def _table(header: list[str], rows: Iterable[tuple[Any, ...]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"
