"""Stored results as pandas tables, for plotting and analysis.

``load`` returns one row per finished run: ``run_id``, ``status``, the resolved settings
(including ``seed`` and ``scale``), the metrics, then ``wall_time_s``, ``device``,
``git_revision`` and ``error``. Series metrics (per step or per epoch) are lists in their
cell; ``series`` unrolls one into long form, one row per (run, step).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from hsbench.engine.spec import DEFAULT_SCALE
from hsbench.engine.store import DEFAULT_RESULTS, Store, is_series


def load(experiment: str, results_dir: str | Path | None = None, scale: str = DEFAULT_SCALE) -> pd.DataFrame:
    """Records of ``experiment`` at ``scale`` under ``results_dir`` (default ``results/``)."""
    return Store(results_dir or DEFAULT_RESULTS, experiment).frame(scale)


def series(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Long form of list-valued column ``metric``: its other columns repeated, plus ``step`` (0-based)."""
    rows = df.dropna(subset=[metric]).drop(columns=[c for c in df.columns if c != metric and is_series(df[c])])
    long = rows.explode(metric, ignore_index=False)
    long["step"] = long.groupby(level=0).cumcount()
    long[metric] = long[metric].astype(float)
    return long.reset_index(drop=True)
