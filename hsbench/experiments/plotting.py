"""Saving figures (PNG and PDF) and markdown tables of the experiment kinds into ``outdir``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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


def mark_epochs(ax, steps_per_epoch: float, last_step: float, paper_epochs: float | None = None) -> None:
    """Dotted vertical lines at 1, 10, 100, ... epochs (labelled at the top) on an axis of steps, up to
    ``last_step``; with ``paper_epochs`` a dashed line there ("paper")."""
    epochs = 1.0
    while epochs * steps_per_epoch <= last_step:
        ax.axvline(epochs * steps_per_epoch, color="gray", lw=0.6, ls=":")
        ax.text(
            epochs * steps_per_epoch,
            1.0,
            f"{epochs:g} ep",
            transform=ax.get_xaxis_transform(),
            fontsize=6,
            ha="center",
            va="bottom",
        )
        epochs *= 10
    if paper_epochs is not None:
        ax.axvline(paper_epochs * steps_per_epoch, color="gray", lw=0.8, ls="--")
