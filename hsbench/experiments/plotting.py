"""Saving figures (PNG and PDF) and markdown tables of the experiment kinds into ``outdir``."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure


def save_figure(fig: Figure, outdir: Path, stem: str) -> list[Path]:
    """Write ``fig`` to ``outdir/stem.png`` and ``outdir/stem.pdf``; returns both paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / f"{stem}.png", outdir / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1], metadata={"CreationDate": None})  # no timestamp: same figure, same file
    return paths


def save_markdown(text: str, outdir: Path, stem: str) -> Path:
    """Write ``text`` to ``outdir/stem.md`` and print it, so a table is seen where it is made."""
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"{stem}.md"
    path.write_text(text)
    print(text)
    return path
