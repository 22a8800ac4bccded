"""Kind ``diag-dominance`` (paper table 1 and figure 3): how diagonal the Hessians w.r.t. pre-activations are.

ρ(A) = ‖diag A‖_F / ‖A‖_F is 1 for a diagonal matrix and about 1/√n for an n×n standard Gaussian
one. One run trains an MLP from one initialization and measures, before and after training,
ρ of the exact Hessian of each example's loss w.r.t. each hidden layer's pre-activations (full
matrices, by Hessian backpropagation), averaged over ``eval_examples`` examples. The figures
average runs; with ``store_matrices`` a run also keeps the matrices of its first example for
the heat maps of figure 3.

During training (``record_points`` > 0; not in the paper): at iteration 0 and at ``record_points``
iterations spaced logarithmically up to ``iterations`` (``record_iterations``), a run also measures ρ,
ρ of the Hessian's Gauss-Newton part (the pre-activation Hessian without the diagonal σ''·∂L/∂h term,
which shrinks with the gradient), the share ‖H − G‖_F / ‖H‖_F of that term, and the mean loss of the
evaluation examples; with ``held_out`` > 0 the last ``held_out`` examples of the data set are never
trained on and the same is measured on ``eval_examples`` of them (overfitting).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsbench.data import MNIST_LIKE, TORCHVISION, mnist_like
from hsbench.engine.kind import Diverged, ExperimentKind, Field
from hsbench.experiments.lazy import colors, curvature, figure, nn, np, optim, pd, torch
from hsbench.experiments.names import ACTIVATIONS, OPTIMIZERS
from hsbench.experiments.networks import INITS, mlp
from hsbench.experiments.plotting import mark_epochs, save_figure, save_markdown

if TYPE_CHECKING:
    from torch import Tensor


def rho(a: Tensor) -> Tensor:
    """Diagonal dominance ‖diag A‖_F / ‖A‖_F of each matrix in a batch (..., n, n)."""
    return torch.linalg.vector_norm(torch.diagonal(a, dim1=-2, dim2=-1), dim=-1) / torch.linalg.matrix_norm(a)


def pre_activation_hessians(
    model: nn.Sequential, loss_fn: nn.Module, x: Tensor, y: Tensor, gauss_newton: bool = False
) -> list[Tensor]:
    """Per-example Hessians (N, n, n) of the loss w.r.t. each hidden Linear layer's output, first to last;
    with ``gauss_newton`` their Gauss-Newton part (no σ''·∂L/∂h terms of the activations above)."""
    with torch.no_grad():
        tape = curvature.tape.record(model, loss_fn, x, y)
        hessians = curvature.hessian_backprop.output_hessians(tape, not gauss_newton)
        found = [h for step, h in hessians if step.has_parameters]
    return found[::-1][:-1]  # forward order, without the output layer


def record_iterations(iterations: int, points: int) -> list[int]:
    """0 and ``points`` iterations spaced logarithmically from 1 to ``iterations`` (duplicates merged)."""
    if points == 0:
        return []
    return sorted({0, *np.unique(np.round(np.geomspace(1, max(iterations, 1), points)).astype(int)).tolist()})


class DiagDominance(ExperimentKind):
    name = "diag-dominance"
    description = (
        "diagonal dominance of the Hessians w.r.t. hidden pre-activations before/after training (table 1, figure 3)"
    )
    fields: Mapping[str, Field] = {
        "data": Field(
            str,
            "'mnist-embedded' (no download), or torchvision's 'mnist' / 'emnist' (from --data-dir)",
            default="mnist-embedded",
            choices=MNIST_LIKE,
        ),
        "width": Field(int, "units per hidden layer", default=128, low=1),
        "depth": Field(int, "hidden layers", default=4, low=1),
        "activation": Field(str, "hidden activation", default="tanh", choices=ACTIVATIONS),
        "init": Field(str, "weight initialization", default="torch-default", choices=INITS),
        "optimizer": Field(str, "training optimizer (hsbench.optim name)", default="sgd", choices=OPTIMIZERS),
        "lr": Field(float, "training step size", default=0.01, low=0.0),
        "iterations": Field(int, "training iterations", default=10000, low=0),
        "batch_size": Field(int, "training batch size", default=32, low=1),
        "eval_examples": Field(
            int, "examples whose Hessians are measured before and after training", default=32, low=1
        ),
        "store_matrices": Field(bool, "keep the first example's matrices (figure 3 heat maps)", default=False),
        "record_points": Field(
            int, "also measure at 0 and this many log-spaced iterations during training", default=0, low=0
        ),
        "held_out": Field(
            int, "last examples of the data set never trained on, measured during training", default=0, low=0
        ),
    }

    devices = ("cpu",)  # trained and measured on the CPU, whatever --device says

    def required_data(self, settings: Mapping[str, Any]) -> list[str]:
        return [settings["data"]] if settings["data"] in TORCHVISION else []

    def run(self, settings: Mapping[str, Any], ctx) -> dict[str, Any]:
        x_all, y_all, provenance = mnist_like(settings["data"], ctx.data_dir)
        if not 0 <= settings["held_out"] < len(y_all):
            raise ValueError(f"held_out = {settings['held_out']} leaves no training example of {len(y_all)}")
        x_test, y_test = x_all[len(y_all) - settings["held_out"] :], y_all[len(y_all) - settings["held_out"] :]
        x_all, y_all = x_all[: len(y_all) - settings["held_out"]], y_all[: len(y_all) - settings["held_out"]]
        classes = int(torch.cat([y_all, y_test]).max()) + 1
        gen = torch.Generator().manual_seed(ctx.seed)
        torch.manual_seed(ctx.seed)
        model = mlp(
            x_all[0].numel(), settings["width"], settings["depth"], classes, settings["activation"], settings["init"]
        )
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
            curvature.extend(model), curvature.extend(loss_fn)
        when = record_iterations(settings["iterations"], settings["record_points"])
        test = torch.randint(0, len(y_test), (settings["eval_examples"],), generator=gen) if len(y_test) else None
        trace: dict[str, list] = {}
        losses: list[float] = []
        for step in range(settings["iterations"] + 1):
            if step in when:
                for key, value in during_training(model, loss_fn, x_eval, y_eval).items():
                    trace.setdefault(key, []).append(value)
                if test is not None:
                    for key, value in during_training(model, loss_fn, x_test[test].double(), y_test[test]).items():
                        trace.setdefault(f"held_out_{key}", []).append(value)
            if step == settings["iterations"]:
                break
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
        if when:
            metrics |= {"record_iterations": when, "train_size": len(y_all), **trace}
        if settings["store_matrices"]:
            metrics["matrices_before"] = [m.tolist() for m in before]
            metrics["matrices_after"] = [m.tolist() for m in after]
        return metrics

    def plot(self, df: pd.DataFrame, spec, outdir: Path) -> list[Path]:
        ok = df[df["status"] == "ok"]
        if ok.empty:
            return []
        if "record_iterations" in ok.columns and ok["record_iterations"].notna().all():
            return training_plots(
                ok, [c for c in self.fields if c in ok.columns and ok[c].nunique() > 1], spec.name, outdir
            )
        table = rho_table(ok)
        spread = f"mean ± standard error over {len(ok)} runs" if len(ok) > 1 else "one run (no standard error)"
        width = int(ok["width"].iloc[0])
        caption = (
            f"Diagonal dominance ρ, {spread}; data: {ok['data_source'].iloc[0]}; "
            f"random Gaussian {width}×{width} matrix: ρ = {ok['rho_random'].mean():.3f}"
        )
        paths = [save_markdown(caption + "\n\n" + table.to_markdown(index=False) + "\n", outdir, spec.name)]
        paths.append(outdir / f"{spec.name}.csv")
        table.to_csv(paths[-1], index=False)
        if "matrices_before" in ok.columns and ok["matrices_before"].notna().any():
            paths += save_figure(heat_maps(ok[ok["matrices_before"].notna()].iloc[0], caption), outdir, spec.name)
        return paths


def during_training(model: nn.Sequential, loss_fn: nn.Module, x: Tensor, y: Tensor) -> dict[str, Any]:
    """ρ of H and of its Gauss-Newton part G per hidden layer, the share ‖H − G‖_F / ‖H‖_F of the
    σ''·∂L/∂h terms, each averaged over the examples (x, y) (float64), and their mean loss."""
    model.double()
    hessians = pre_activation_hessians(model, loss_fn, x, y)
    ggns = pre_activation_hessians(model, loss_fn, x, y, gauss_newton=True)
    with torch.no_grad():
        loss = float(loss_fn(model(x), y))
    model.float()
    return {
        "rho": [float(rho(h).mean()) for h in hessians],
        "rho_gauss_newton": [float(rho(g).mean()) for g in ggns],
        "sigma2_share": [
            float((torch.linalg.matrix_norm(h - g) / torch.linalg.matrix_norm(h)).mean())
            for h, g in zip(hessians, ggns, strict=True)
        ],
        "loss": loss,
    }


def rho_table(ok: pd.DataFrame) -> pd.DataFrame:
    """Per hidden layer: mean of ρ before and after training and, over more than one run, its standard error."""
    values = {when: np.array(ok[f"rho_{when}"].tolist()) for when in ("before", "after")}  # runs x layers
    table = pd.DataFrame({"layer": range(1, values["before"].shape[1] + 1)})
    for when, v in values.items():
        table[f"rho_{when}"] = np.round(v.mean(0), 3)
    if len(ok) > 1:
        for when, v in values.items():
            table[f"se_{when}"] = np.round(v.std(0, ddof=1) / math.sqrt(len(v)), 3)
    return table


def heat_maps(run: pd.Series, caption: str) -> figure.Figure:
    """|H| of each hidden layer before (top) and after (bottom) training, log color scale."""
    layers = len(run["matrices_before"])
    fig = figure.Figure(figsize=(3 * layers, 6.4), layout="constrained")
    axes = fig.subplots(2, layers, squeeze=False)
    for row, when in enumerate(("before", "after")):
        for k, matrix in enumerate(run[f"matrices_{when}"]):
            values = np.abs(np.array(matrix)) + 1e-12
            norm = colors.LogNorm(vmin=values.max() * 1e-4, vmax=values.max())
            image = axes[row, k].imshow(values, cmap="RdBu", norm=norm)
            axes[row, k].set_title(f"layer {k + 1}, {when}: ρ = {run[f'rho_{when}'][k]:.2f} (mean)", fontsize=8)
            axes[row, k].set_xticks([])
            axes[row, k].set_yticks([])
        fig.colorbar(image, ax=axes[row, -1], shrink=0.8)
    fig.suptitle(
        "|Hessian of the loss w.r.t. pre-activations| of one example (red small, blue large)\n" + caption, fontsize=8
    )
    return fig


PAPER_EPOCHS = 10000 * 32 / 112800  # table 1: 10,000 iterations of batch 32 on EMNIST balanced's 112,800 images


def training_plots(ok: pd.DataFrame, varying: list[str], name: str, outdir: Path) -> list[Path]:
    """Runs with ``record_points``: one row of panels per setting of the ``varying`` fields (ρ, ρ of
    the Gauss-Newton part, share of the σ''·∂L/∂h terms, loss against iterations, mean ± standard
    error over runs, epochs on the top axis), and a table at iteration 0, at the paper's 2.8
    epochs and at the end (``<name>.md``, all points in ``<name>.csv``)."""
    groups = list(ok.groupby(varying, sort=False)) if varying else [((), ok)]
    panels = ("rho", "rho_gauss_newton", "sigma2_share", "loss")
    titles = ("ρ(H)", "ρ(Gauss-Newton part G)", "‖H − G‖_F / ‖H‖_F (σ''·∂L/∂h terms)", "mean loss")
    fig = figure.Figure(figsize=(15, 3.2 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), len(panels), squeeze=False)
    rows = []
    for row, (key, runs) in enumerate(groups):
        label = ", ".join(f"{f}={v}" for f, v in zip(varying, key if isinstance(key, tuple) else (key,), strict=True))
        steps = np.array(runs["record_iterations"].iloc[0])
        epochs = steps * int(runs["batch_size"].iloc[0]) / int(runs["train_size"].iloc[0])
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            for prefix, style in (("", "-"), ("held_out_", ":")):
                if f"{prefix}{panel}" not in runs.columns or runs[f"{prefix}{panel}"].isna().any():
                    continue
                values = np.array(runs[f"{prefix}{panel}"].tolist(), dtype=float)  # runs x points (x layers)
                values = values if values.ndim == 3 else values[..., None]
                mean, se = (
                    values.mean(0),
                    values.std(0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else 0 * values[0],
                )
                for layer in range(mean.shape[1]):
                    tag: str | None = f"layer {layer + 1}" if mean.shape[1] > 1 else "train examples"
                    tag = tag if not prefix else ("held out" if mean.shape[1] == 1 else None)
                    line = ax.plot(steps, mean[:, layer], style, color=f"C{layer}", label=tag)[0]
                    ax.fill_between(
                        steps,
                        mean[:, layer] - se[:, layer],
                        mean[:, layer] + se[:, layer],
                        color=line.get_color(),
                        alpha=0.2,
                    )
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(0, steps[-1])
            mark_epochs(ax, int(runs["train_size"].iloc[0]) / int(runs["batch_size"].iloc[0]), steps[-1], PAPER_EPOCHS)
            ax.set_title(f"{titles[col]}\n{label}", fontsize=8, pad=10)
            ax.set_xlabel("iterations")
            if row == 0 and col in (0, 3):
                ax.legend(fontsize=7)
        for point in sorted({0, int(np.abs(epochs - PAPER_EPOCHS).argmin()), len(steps) - 1}):
            means = {
                k: np.mean(runs[k].map(lambda v, p=point: v[p]).tolist(), axis=0)
                for k in ("rho", "rho_gauss_newton", "loss")
            }
            held = (
                runs["held_out_loss"].map(lambda v, p=point: v[p]).mean() if "held_out_loss" in runs.columns else np.nan
            )
            rows.append(
                {
                    "setting": label,
                    "iteration": int(steps[point]),
                    "epochs": round(float(epochs[point]), 2),
                    **{f"rho_{k + 1}": round(float(v), 3) for k, v in enumerate(means["rho"])},
                    **{f"rho_gn_{k + 1}": round(float(v), 3) for k, v in enumerate(means["rho_gauss_newton"])},
                    "loss": round(float(means["loss"]), 4),
                    "held_out_loss": round(float(held), 4),
                }
            )
    fig.suptitle(
        f"ρ of pre-activation Hessians during training, mean ± standard error over runs (solid: training examples, "
        f"dotted: held out; vertical lines: 1, 10, 100 epochs, dashed: the paper's {PAPER_EPOCHS:.1f} epochs)",
        fontsize=9,
    )
    table = pd.DataFrame(rows)
    paths = [*save_figure(fig, outdir, name), outdir / f"{name}.csv"]
    table.to_csv(paths[-1], index=False)
    caption = (
        f"ρ during training (iteration 0, nearest the paper's {PAPER_EPOCHS:.2f} epochs, last), mean over runs; data: "
    )
    caption += "; ".join(sorted(set(ok["data_source"])))
    paths.append(save_markdown(caption + "\n\n" + table.to_markdown(index=False) + "\n", outdir, name))
    return paths
