"""Kind ``approx-quality`` (paper figure 2): how far each Hessian-diagonal estimate is from the exact one.

One run is one initialization. The network is trained by SGD with batch size 1; at each of the
``examples`` examples it meets, every method estimates the Hessian diagonal of that example's
loss, and its L1 distance to the exact diagonal is summed over each layer's parameters. Stored
per run: the mean over examples of the total L1 error per method (``l1/<method>``) and per layer
(``l1_layers/<method>``), and the mean L1 norm of the exact diagonal (``norm_diag``). The
figures normalize each method's error by HesScale's error of the same initialization.

During training (not in the paper): with ``measure_every`` = k the estimates are computed at every
k-th example only (the run still trains on all ``examples``), and with ``record_every`` = b the mean
errors are also stored per block of b SGD steps (``trace_iterations``: each block's first step;
``l1_trace/<method>``, ``norm_diag_trace``), so that a run can follow several epochs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hsbench.data import TORCHVISION, mnist_like
from hsbench.engine.kind import ExperimentKind, Field
from hsbench.experiments.lazy import curvature, figure, nn, np, optim, pd, torch
from hsbench.experiments.names import ACTIVATIONS
from hsbench.experiments.networks import INITS, mlp, small_cnn
from hsbench.experiments.plotting import mark_epochs, save_figure, save_markdown


def compared_methods(mc_large: int) -> dict[str, tuple[str, int]]:
    """The paper's methods as labels -> (curvature method, Monte-Carlo samples)."""
    return {
        "hesscale": ("hesscale", 1),
        "hesscale-gn": ("hesscale-gn", 1),
        "bl89": ("bl89", 1),
        "ggn": ("ggn", 1),
        "ggn-mc-1": ("ggn-mc", 1),
        f"ggn-mc-{mc_large}": ("ggn-mc", mc_large),
        "hutchinson-1": ("hutchinson", 1),
        f"hutchinson-{mc_large}": ("hutchinson", mc_large),
        "grad2": ("grad2", 1),
        "kfac-1": ("kfac", 1),
        f"kfac-{mc_large}": ("kfac", mc_large),
    }


def build_model(settings: Mapping[str, Any], inputs: int, classes: int) -> nn.Sequential:
    if settings["model"] == "mlp":
        return mlp(inputs, settings["width"], settings["depth"], classes, settings["activation"], settings["init"])
    return small_cnn(classes, settings["activation"])


def load_examples(
    settings: Mapping[str, Any], data_dir, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, str]:
    if settings["data"] == "random":  # the workshop paper's random-data setting
        count = max(settings["examples"], 1)
        x = torch.randn(count, settings["inputs"], generator=generator)
        y = torch.randint(0, settings["classes"], (count,), generator=generator)
        return x, y, f"random data ({settings['inputs']} Gaussian inputs, {settings['classes']} classes)"
    return mnist_like(settings["data"], data_dir)


class ApproxQuality(ExperimentKind):
    name = "approx-quality"
    description = "L1 error of every Hessian-diagonal method against the exact diagonal along an SGD run (figure 2)"
    fields: Mapping[str, Field] = {
        "data": Field(
            str,
            "'mnist-embedded' (no download), 'mnist' (torchvision, from --data-dir) or 'random'",
            default="mnist-embedded",
            choices=("mnist-embedded", "mnist", "random"),
        ),
        "model": Field(str, "network: 'mlp' or 'cnn'", default="mlp", choices=("mlp", "cnn")),
        "width": Field(int, "hidden units per layer (mlp)", default=32, low=1),
        "depth": Field(int, "hidden layers (mlp)", default=3, low=1),
        "activation": Field(str, "hidden activation", default="tanh", choices=ACTIVATIONS),
        "init": Field(
            str, "initialization (mlp; the cnn is Kaiming with zero biases)", default="kaiming", choices=INITS
        ),
        "inputs": Field(int, "input dimension of random data", default=6, low=1),
        "classes": Field(int, "classes of random data", default=10, low=2),
        "examples": Field(int, "examples per initialization (SGD steps of batch size 1)", default=1000, low=1),
        "sgd_lr": Field(float, "SGD step size of the run along which examples are met", default=0.01, low=0.0),
        "mc_large": Field(int, "Monte-Carlo samples of the many-sample variants", default=50, low=2),
        "measure_every": Field(int, "estimate at every k-th example met (the run trains on all)", default=1, low=1),
        "record_every": Field(
            int, "also store mean errors per block of this many SGD steps (0: none)", default=0, low=0
        ),
    }

    devices = ("cpu",)  # float64 on the CPU, whatever --device says

    def required_data(self, settings: Mapping[str, Any]) -> list[str]:
        return [settings["data"]] if settings["data"] in TORCHVISION else []

    def run(self, settings: Mapping[str, Any], ctx) -> dict[str, Any]:
        data_gen = torch.Generator().manual_seed(ctx.seed)
        x_all, y_all, provenance = load_examples(settings, ctx.data_dir, data_gen)
        classes = settings["classes"] if settings["data"] == "random" else int(y_all.max()) + 1
        x_all = x_all.double()  # float64: errors measured without float32 rounding
        torch.manual_seed(ctx.seed)
        model = build_model(settings, x_all[0].numel(), classes).double()
        loss_fn = nn.CrossEntropyLoss()
        sgd = optim.make("sgd", model.parameters(), lr=settings["sgd_lr"])  # the run along which examples are met
        requests = {"exact": ("exact", 1), **compared_methods(settings["mc_large"])}
        grad2 = [label for label, (method, _) in requests.items() if method == "grad2"]  # no draws: order free
        without_grad2 = {label: request for label, request in requests.items() if label not in grad2}
        layers = [m for m in model if list(m.parameters(recurse=False))]
        layer_of = {id(p): i for i, m in enumerate(layers) for p in m.parameters(recurse=False)}
        names = [name for name, _ in model.named_parameters()]
        sizes = [p.numel() for p in model.parameters()]
        layer_index = torch.tensor([layer_of[id(p)] for p in model.parameters()])  # the layer of each parameter
        order = torch.randint(0, len(y_all), (settings["examples"],), generator=data_gen)
        mc_gen = torch.Generator().manual_seed(ctx.seed + 1)

        sums = torch.zeros(len(requests), len(layers), dtype=torch.float64)  # row 0: |exact|
        every, block = settings["measure_every"], settings["record_every"]
        blocks = -(-settings["examples"] // block) if block else 0
        trace = torch.zeros(blocks, len(requests), dtype=torch.float64)  # per block: summed totals over layers
        counts = torch.zeros(blocks, dtype=torch.float64)  # examples measured per block
        start = 0
        state = ctx.load_checkpoint()
        if state is not None:
            model.load_state_dict(state["model"])
            mc_gen.set_state(state["mc_generator"])
            sums, start = state["sums"], state["done"]
            trace, counts = state.get("trace", trace), state.get("counts", counts)
        for i in range(start, settings["examples"]):
            x, y = x_all[order[i] : order[i] + 1], y_all[order[i] : order[i] + 1]
            measured = i % every == 0
            batch = curvature.Batch(model, loss_fn, x, y, gradient_along=True)  # one recording for all of it
            if measured:
                found = curvature.batch_diagonals(batch, without_grad2, generator=mc_gen)
            gradients = batch.gradient()  # the same example and parameters
            for name, p in batch.trainable:  # every gradient replaced: no zero_grad needed
                p.grad = gradients[name]
            sgd.step()  # Diverged (recorded by the engine) where a gradient is not finite, as after a non-finite loss
            if measured:
                found |= {label: {n: g.square() for n, g in gradients.items()} for label in grad2}
                flat = torch.cat([found[label][name].reshape(-1) for label in requests for name in names])
                # in place: a fresh copy of these rows costs more than the rest of the error computation
                errors = flat.view(len(requests), -1)
                errors[1:].sub_(errors[:1])
                errors.abs_()  # row 0: |exact|, the others |estimate - exact|
                per_parameter = torch.stack([part.sum(1) for part in errors.split(sizes, 1)], 1)
                sums.index_add_(1, layer_index, per_parameter)
                totals = per_parameter.sum(1)
                if block:
                    trace[i // block] += totals
                    counts[i // block] += 1
            if ctx.checkpoint_due():
                ctx.save_checkpoint(
                    {
                        "model": model.state_dict(),
                        "mc_generator": mc_gen.get_state(),
                        "sums": sums,
                        "done": i + 1,
                        "trace": trace,
                        "counts": counts,
                    }
                )
        means = sums / len(range(0, settings["examples"], every))
        metrics: dict[str, Any] = {
            "data_source": provenance,
            "norm_diag": float(means[0].sum()),
            "norm_diag_layers": means[0].tolist(),
        }
        for row, label in enumerate(requests):
            if row:
                metrics[f"l1/{label}"] = float(means[row].sum())
                metrics[f"l1_layers/{label}"] = means[row].tolist()
        if block:
            block_means = trace / counts.unsqueeze(1)  # a block without a measured example: NaN
            metrics["trace_iterations"] = list(range(0, settings["examples"], block))
            metrics["train_size"] = len(y_all)
            metrics["norm_diag_trace"] = block_means[:, 0].tolist()
            metrics |= {f"l1_trace/{label}": block_means[:, row].tolist() for row, label in enumerate(requests) if row}
        return metrics

    def plot(self, df: pd.DataFrame, spec, outdir: Path) -> list[Path]:
        ok = df[df["status"] == "ok"].sort_values("seed")
        if ok.empty:
            return []
        if "trace_iterations" in ok.columns and ok["trace_iterations"].notna().all():
            return training_plots(
                ok, [c for c in self.fields if c in ok.columns and ok[c].nunique() > 1], spec.name, outdir
            )
        labels = [c[len("l1/") :] for c in ok.columns if c.startswith("l1/")]
        normalized = pd.DataFrame({label: ok[f"l1/{label}"] / ok["l1/hesscale"] for label in labels})
        reference = ok["norm_diag"] / ok["l1/hesscale"]
        caption = (
            f"{len(ok)} initializations x {int(ok['examples'].iloc[0])} examples; data: {ok['data_source'].iloc[0]}"
        )
        name = spec.name + ("-" if "-" in spec.name else "")
        return [
            *save_figure(_normalized_figure(normalized, reference, ok["seed"], caption), outdir, f"{name}a"),
            *save_figure(_layer_figure(ok, labels, caption), outdir, f"{name}b"),
        ]


def _normalized_figure(normalized: pd.DataFrame, reference: pd.Series, seeds: pd.Series, caption: str) -> figure.Figure:
    """One dot per initialization and method; an initialization's colour (its seed) is the same for every method."""
    from matplotlib import cm, colormaps, colors

    fig = figure.Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["turbo"].resampled(max(len(seeds), 2))
    norm = colors.BoundaryNorm(np.arange(len(seeds) + 1) - 0.5, cmap.N)
    jitter = np.linspace(-0.25, 0.25, len(normalized)) if len(normalized) > 1 else np.zeros(1)
    for i, label in enumerate(normalized.columns):
        ax.scatter(i + jitter, normalized[label], c=np.arange(len(seeds)), cmap=cmap, norm=norm, s=14, alpha=0.8)
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.01, aspect=30)
    ticks = np.unique(np.linspace(0, len(seeds) - 1, min(len(seeds), 6)).round().astype(int))
    bar.set_ticks(ticks.tolist(), labels=[str(seeds.iloc[k]) for k in ticks])
    bar.set_label("initialization (seed); dots left to right", fontsize=8)
    ax.axhline(1.0, color="k", lw=1, label="HesScale")
    ax.axhline(float(reference.mean()), color="gray", ls="--", lw=1, label="|diag(H)|")
    ax.set_yscale("log")
    ax.set_xticks(range(len(normalized.columns)), normalized.columns, rotation=35, ha="right")
    ax.set_ylabel("L1 error / HesScale's L1 error")
    ax.set_title(f"Normalized L1 error of Hessian-diagonal approximations\n{caption}", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _layer_figure(ok: pd.DataFrame, labels: list[str], caption: str) -> figure.Figure:
    per_layer = {label: np.mean(ok[f"l1_layers/{label}"].tolist(), axis=0) for label in labels}
    layers = len(next(iter(per_layer.values())))
    fig = figure.Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(labels)
    colors = plt_colors(len(labels))
    for i, label in enumerate(labels):
        offset = (i - len(labels) / 2 + 0.5) * width
        ax.bar(np.arange(layers) + offset, per_layer[label], width, label=label, color=colors[i])
    ax.set_yscale("log")
    values = np.concatenate(list(per_layer.values()))
    ax.set_ylim(bottom=np.median(values) * 1e-4)  # rounding-level errors (exact methods) draw no bar
    ax.set_xticks(range(layers), [f"layer {k + 1}" for k in range(layers)])
    ax.set_ylabel("mean L1 error")
    ax.set_title(
        f"Layer-wise L1 error (no bar: exact, as HesScale(GN) and GGN at the last layer)\n{caption}", fontsize=9
    )
    fig.legend(fontsize=7, loc="outside right upper")
    return fig


def plt_colors(count: int) -> list:
    """``count`` distinct colors (tab20)."""
    from matplotlib import colormaps

    return [colormaps["tab20"](i % 20) for i in range(count)]


def training_plots(ok: pd.DataFrame, varying: list[str], name: str, outdir: Path) -> list[Path]:
    """Runs with ``record_every``: per setting of the ``varying`` fields, each method's error divided
    by HesScale's (same run and block; left) and the errors themselves with |diag(H)| (right) against
    SGD steps (block centres, log axis), mean ± standard error over runs, epochs on the top axis;
    the normalized errors of the first and last block in ``<name>.md``, all of them in ``<name>.csv``."""
    groups = list(ok.groupby(varying, sort=False)) if varying else [((), ok)]
    labels = [c[len("l1_trace/") :] for c in ok.columns if c.startswith("l1_trace/")]
    colors = plt_colors(len(labels))
    fig = figure.Figure(figsize=(13, 3.8 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False)
    rows = []
    for row, (key, runs) in enumerate(groups):
        setting = ", ".join(f"{f}={v}" for f, v in zip(varying, key if isinstance(key, tuple) else (key,), strict=True))
        steps = np.array(runs["trace_iterations"].iloc[0], dtype=float)
        centre = steps + int(runs["record_every"].iloc[0]) / 2
        per_epoch = float(runs["train_size"].iloc[0])
        hesscale = np.array(runs["l1_trace/hesscale"].tolist())
        for ax, normalize in zip(axes[row], (True, False), strict=True):
            curves = [
                (label, np.array(runs[f"l1_trace/{label}"].tolist()), colors[i], "-") for i, label in enumerate(labels)
            ]
            curves.append(("|diag(H)|", np.array(runs["norm_diag_trace"].tolist()), "gray", "--"))
            for label, values, color, style in curves:
                values = values / hesscale if normalize else values  # runs x blocks
                mean = values.mean(0)
                se = values.std(0, ddof=1) / np.sqrt(len(values)) if len(values) > 1 else np.zeros_like(mean)
                ax.plot(centre, mean, style, color=color, label=label)
                ax.fill_between(centre, mean - se, mean + se, color=color, alpha=0.2)
                if normalize:
                    rows += [
                        {
                            "setting": setting,
                            "step": int(steps[b]),
                            "epochs": round(steps[b] / per_epoch, 2),
                            "method": label,
                            "ratio": round(float(mean[b]), 3),
                            "se": round(float(se[b]), 3),
                        }
                        for b in range(len(steps))
                    ]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("SGD steps (batch size 1)")
            mark_epochs(ax, per_epoch, centre[-1])
            ax.set_ylabel("L1 error / HesScale's" if normalize else "mean L1 error")
            ax.set_title(
                ("Normalized" if normalize else "Absolute") + f" L1 error per block of steps; {setting}",
                fontsize=8,
                pad=10,
            )
        if row == 0:
            axes[row, 1].legend(fontsize=6, ncol=2)
    fig.suptitle(
        f"Approximation quality during training, mean ± standard error over runs; data: {ok['data_source'].iloc[0]}",
        fontsize=9,
    )
    table = pd.DataFrame(rows)
    paths = [*save_figure(fig, outdir, name), outdir / f"{name}.csv"]
    table.to_csv(paths[-1], index=False)
    ends = table[table["step"].isin([table["step"].min(), table["step"].max()])]
    wide = ends.pivot_table(index=["setting", "method"], columns="step", values="ratio", sort=False).reset_index()
    wide.columns = [
        c if isinstance(c, str) else f"steps {c}–{c + int(ok['record_every'].iloc[0]) - 1}" for c in wide.columns
    ]
    caption = "L1 error / HesScale's L1 error in the first and the last block of SGD steps, mean over runs"
    paths.append(save_markdown(caption + "\n\n" + wide.to_markdown(index=False) + "\n", outdir, name))
    return paths
