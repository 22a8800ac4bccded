"""Kind ``diag-dominance`` (paper table 1 and figure 3): how diagonal the Hessians w.r.t. pre-activations are.

ρ(A) = ‖diag A‖_F / ‖A‖_F is 1 for a diagonal matrix and about 1/√n for an n×n standard Gaussian
one. One run trains an MLP from one initialization and measures, before and after training,
ρ of the exact Hessian of each example's loss w.r.t. each hidden layer's pre-activations (full
matrices, by Hessian backpropagation), averaged over ``eval_examples`` examples. The figures
average runs; with ``store_matrices`` a run also keeps the matrices of its first example for
the heat maps of figure 3.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from hsbench.activations import ACTIVATIONS
from hsbench.curvature import extend
from hsbench.curvature.hessian_backprop import output_hessians
from hsbench.curvature.tape import record
from hsbench.data import MNIST_LIKE, TORCHVISION, mnist_like
from hsbench.engine.kind import Diverged, ExperimentKind, Field
from hsbench.experiments.networks import INITS, mlp
from hsbench.experiments.plotting import save_figure, save_markdown
from hsbench import optim


def rho(a: Tensor) -> Tensor:
    """Diagonal dominance ‖diag A‖_F / ‖A‖_F of each matrix in a batch (..., n, n)."""
    return torch.linalg.vector_norm(torch.diagonal(a, dim1=-2, dim2=-1), dim=-1) / torch.linalg.matrix_norm(a)


def pre_activation_hessians(model: nn.Sequential, loss_fn: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """Per-example Hessians (N, n, n) of the loss w.r.t. each hidden Linear layer's output, first to last."""
    with torch.no_grad():
        found = [h for step, h in output_hessians(record(model, loss_fn, x, y)) if step.has_parameters]
    return found[::-1][:-1]  # forward order, without the output layer


class DiagDominance(ExperimentKind):
    name = "diag-dominance"
    description = "diagonal dominance of the Hessians w.r.t. hidden pre-activations before/after training (table 1, figure 3)"
    fields = {
        "data": Field(
            str, "'mnist-embedded' (no download), or torchvision's 'mnist' / 'emnist' (from --data-dir)",
            default="mnist-embedded", choices=MNIST_LIKE,
        ),
        "width": Field(int, "units per hidden layer", default=128, low=1),
        "depth": Field(int, "hidden layers", default=4, low=1),
        "activation": Field(str, "hidden activation", default="tanh", choices=tuple(ACTIVATIONS)),
        "init": Field(str, "weight initialization", default="torch-default", choices=INITS),
        "optimizer": Field(str, "training optimizer (hsbench.optim name)", default="sgd", choices=lambda: tuple(optim.OPTIMIZERS)),
        "lr": Field(float, "training step size", default=0.01, low=0.0),
        "iterations": Field(int, "training iterations", default=10000, low=0),
        "batch_size": Field(int, "training batch size", default=32, low=1),
        "eval_examples": Field(int, "examples whose Hessians are measured before and after training", default=32, low=1),
        "store_matrices": Field(bool, "keep the first example's matrices (figure 3 heat maps)", default=False),
    }

    devices = ("cpu",)  # trained and measured on the CPU, whatever --device says

    def required_data(self, settings: dict[str, Any]) -> list[str]:
        return [settings["data"]] if settings["data"] in TORCHVISION else []

    def run(self, settings: dict[str, Any], ctx) -> dict[str, Any]:
        x_all, y_all, provenance = mnist_like(settings["data"], ctx.data_dir)
        gen = torch.Generator().manual_seed(ctx.seed)
        torch.manual_seed(ctx.seed)
        classes = int(y_all.max()) + 1
        model = mlp(x_all[0].numel(), settings["width"], settings["depth"], classes, settings["activation"], settings["init"])
        loss_fn = nn.CrossEntropyLoss()
        evaluation = torch.randint(0, len(y_all), (settings["eval_examples"],), generator=gen)
        x_eval, y_eval = x_all[evaluation].double(), y_all[evaluation]

        def measure() -> tuple[list[float], list[Tensor]]:
            hessians = pre_activation_hessians(model.double(), loss_fn, x_eval, y_eval)
            model.float()
            return [float(rho(h).mean()) for h in hessians], [h[0] for h in hessians]

        rho_before, before = measure()
        optimizer = optim.make(settings["optimizer"], model.parameters(), lr=settings["lr"])
        if optimizer.needs_recording:
            extend(model), extend(loss_fn)
        losses: list[float] = []
        for step in range(settings["iterations"]):
            batch = torch.randint(0, len(y_all), (settings["batch_size"],), generator=gen)
            try:
                loss = optim.train_step(optimizer, model, loss_fn, x_all[batch], y_all[batch])
            except optim.Diverged as error:
                raise Diverged(f"iteration {step}: {error}", {"train_loss": losses}) from error
            if step % 100 == 0:
                losses.append(loss.item())
        rho_after, after = measure()
        n = settings["width"]
        reference = rho(torch.randn(1000, n, n, generator=gen, dtype=torch.float64)).mean()
        metrics = {
            "data_source": provenance,
            "rho_before": rho_before,
            "rho_after": rho_after,
            "rho_random": float(reference),
            "train_loss": losses,
        }
        if settings["store_matrices"]:
            metrics["matrices_before"] = [m.tolist() for m in before]
            metrics["matrices_after"] = [m.tolist() for m in after]
        return metrics

    def plot(self, df: pd.DataFrame, spec, outdir: Path) -> list[Path]:
        ok = df[df["status"] == "ok"]
        if ok.empty:
            return []
        table = rho_table(ok)
        caption = (
            f"Diagonal dominance ρ, mean ± standard error over {len(ok)} runs; data: {ok['data_source'].iloc[0]}; "
            f"random Gaussian {int(ok['width'].iloc[0])}×{int(ok['width'].iloc[0])} matrix: ρ = {ok['rho_random'].mean():.3f}"
        )
        paths = [save_markdown(caption + "\n\n" + table.to_markdown(index=False) + "\n", outdir, spec.name)]
        paths.append(outdir / f"{spec.name}.csv")
        table.to_csv(paths[-1], index=False)
        if "matrices_before" in ok.columns and ok["matrices_before"].notna().any():
            paths += save_figure(heat_maps(ok[ok["matrices_before"].notna()].iloc[0], caption), outdir, spec.name)
        return paths


def rho_table(ok: pd.DataFrame) -> pd.DataFrame:
    """Per hidden layer: mean and standard error of ρ before and after training."""
    rows = []
    for when in ("before", "after"):
        values = np.array(ok[f"rho_{when}"].tolist())  # runs x layers
        se = values.std(0, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else np.full(values.shape[1], np.nan)
        rows.append((when, values.mean(0), se))
    layers = len(rows[0][1])
    return pd.DataFrame(
        {
            "layer": range(1, layers + 1),
            **{f"rho_{when}": np.round(mean, 3) for when, mean, _ in rows},
            **{f"se_{when}": np.round(se, 3) for when, _, se in rows},
        }
    )


def heat_maps(run: pd.Series, caption: str) -> Figure:
    """|H| of each hidden layer before (top) and after (bottom) training, log color scale."""
    from matplotlib.colors import LogNorm

    layers = len(run["matrices_before"])
    fig = Figure(figsize=(3 * layers, 6.4), layout="constrained")
    axes = fig.subplots(2, layers, squeeze=False)
    for row, when in enumerate(("before", "after")):
        for k, matrix in enumerate(run[f"matrices_{when}"]):
            values = np.abs(np.array(matrix)) + 1e-12
            image = axes[row, k].imshow(values, cmap="RdBu", norm=LogNorm(vmin=values.max() * 1e-4, vmax=values.max()))
            axes[row, k].set_title(f"layer {k + 1}, {when}: ρ = {run[f'rho_{when}'][k]:.2f} (mean)", fontsize=8)
            axes[row, k].set_xticks([])
            axes[row, k].set_yticks([])
        fig.colorbar(image, ax=axes[row, -1], shrink=0.8)
    fig.suptitle("|Hessian of the loss w.r.t. pre-activations| of one example (red small, blue large)\n" + caption, fontsize=8)
    return fig
