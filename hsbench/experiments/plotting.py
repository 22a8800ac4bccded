"""Saving figures: every figure goes to ``outdir`` as PNG and PDF."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def save_figure(fig: Figure, outdir: Path, stem: str) -> list[Path]:
    """Write ``fig`` to ``outdir/stem.png`` and ``outdir/stem.pdf``; returns both paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / f"{stem}.png", outdir / f"{stem}.pdf"]
    for path in paths:
        fig.savefig(path, dpi=150)
    return paths
