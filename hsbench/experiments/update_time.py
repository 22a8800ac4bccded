"""Kind ``update-time`` (paper appendix D, figure 8): how each optimizer's update time grows with the network.

An update is the whole training step, the same for every optimizer::

    opt.zero_grad()
    loss = loss_fn(model(x), y)
    opt.backward(loss)
    opt.step()

so it holds the forward pass, the backward pass of first- and second-order information and the
parameter update; Adam and SGD are ``torch.optim.Adam`` / ``SGD`` with their defaults and a
plain ``loss.backward()``. One run is one panel at one batch size: for each network of the panel
(in turn), every optimizer of ``OPTIMIZERS`` updates it ``warmup + updates`` times, interleaved
round-robin in random order (``hsbench.timing``). All optimizers start from the same initial
weights, which are restored (untimed) before every update, so each update times the same
computation and none can diverge. Adam and SGD update a copy without the recording hooks of
``hsbench.curvature.extend``, the curvature optimizers one with them.

Panels (64 inputs, hidden layers of 512 tanh units, cross-entropy loss on a fixed random batch):
(a) one hidden layer, 2^4 … ``max_outputs`` outputs; (b) 1 … ``max_depth`` hidden layers
(powers of two), 100 outputs. Stored per run: ``sizes`` (outputs or depth), ``params`` (the
number of parameters of each network), ``torch_threads``, ``gpu`` (the CUDA device's name; absent
on the CPU), and per optimizer the ``times_s``
(a list of update times per network) with their ``median_s``, ``q25_s`` and ``q75_s``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hsbench.engine.kind import ExperimentKind, Field
from hsbench.experiments.lazy import curvature, figure, nn, np, optim, pd, timing, torch
from hsbench.experiments.names import CLOCKS
from hsbench.experiments.networks import mlp
from hsbench.experiments.plotting import save_figure, save_markdown

INPUTS, WIDTH, OUTPUTS_B, FIRST_OUTPUTS = 64, 512, 100, 16
PAPER_RATIOS = {"adahessian": 3.0, "adahesscale": 2.0, "adahesscale-gn": 1.25}  # appendix D, "on average"


def powers_of_two(low: int, high: int) -> list[int]:
    """The powers of two from ``low`` to ``high`` (both powers of two), inclusive."""
    return [2**k for k in range(low.bit_length() - 1, high.bit_length())]


def panel_sizes(panel: str, max_outputs: int, max_depth: int) -> list[int]:
    """Numbers of outputs (panel a) or of hidden layers (panel b) of the panel's networks."""
    return powers_of_two(FIRST_OUTPUTS, max_outputs) if panel == "a" else powers_of_two(1, max_depth)


def panel_network(panel: str, size: int) -> nn.Sequential:
    """The network of ``panel`` with ``size`` outputs (a) or hidden layers (b); PyTorch's default init."""
    depth, outputs = (1, size) if panel == "a" else (size, OUTPUTS_B)
    return mlp(INPUTS, WIDTH, depth, outputs, "tanh", init="torch-default")


def twin_models(build: Callable[[], nn.Module], seed: int, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """Two copies of ``build()`` with the same initialization (seeded by ``seed``): a plain one, and
    one extended with the curvature recording hooks for the optimizers that need them."""
    models = []
    for _ in range(2):
        torch.manual_seed(seed)
        models.append(build().to(device))
    return models[0], curvature.extend(models[1])


def update_tasks(
    plain: nn.Module, extended: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> dict[str, timing.Task]:
    """For each optimizer in ``names``: (restore the initial weights, one update), on ``extended``
    for the optimizers that need the recording hooks (``needs_recording``), else on ``plain``."""
    initial = [p.detach().clone() for p in plain.parameters()]
    losses = {False: nn.CrossEntropyLoss(), True: curvature.extend(nn.CrossEntropyLoss())}
    tasks: dict[str, timing.Task] = {}
    for name in names:
        recording = optim.OPTIMIZERS[name].needs_recording
        model = extended if recording else plain
        opt = optim.make(name, model.parameters())
        tasks[name] = (_restorer(model, initial), _updater(model, losses[recording], opt, x, y))
    return tasks


def _restorer(model: nn.Module, initial: list[torch.Tensor]) -> Callable[[], None]:
    @torch.no_grad()
    def restore() -> None:
        for p, p0 in zip(model.parameters(), initial, strict=True):
            p.copy_(p0)

    return restore


def _updater(model: nn.Module, loss_fn: nn.Module, opt: optim.Optimizer, x, y) -> Callable[[], object]:
    return lambda: optim.train_step(opt, model, loss_fn, x, y)


class UpdateTime(ExperimentKind):
    name = "update-time"
    description = "update time of every optimizer vs the number of parameters (figure 8)"
    fields: Mapping[str, Field] = {
        "panel": Field(
            str,
            "'a': outputs 2^4 … max_outputs, one hidden layer; 'b': 1 … max_depth hidden layers, 100 outputs",
            default="a",
            choices=("a", "b"),
        ),
        "max_outputs": Field(
            int, "largest number of outputs of panel a", default=512, choices=powers_of_two(FIRST_OUTPUTS, 4096)
        ),
        "max_depth": Field(
            int, "largest number of hidden layers of panel b", default=128, choices=powers_of_two(1, 1024)
        ),
        "batch_size": Field(int, "examples per update", default=1, low=1),
        "updates": Field(int, "timed updates per optimizer and network", default=30, low=2),
        "warmup": Field(int, "untimed updates per optimizer and network before the timed ones", default=5, low=0),
        "threads": Field(int, "torch threads during the run (1: stable timings on a shared machine)", default=1, low=1),
        "clock": Field(
            str,
            "'wall' (perf_counter) or 'cpu' (CPU time of the process; CPU devices only)",
            default="wall",
            choices=CLOCKS,
        ),
    }

    def run(self, settings: Mapping[str, Any], ctx) -> dict[str, Any]:
        device = torch.device(ctx.device)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(settings["threads"])
        try:
            return self._measure(settings, device, ctx.seed)
        finally:
            torch.set_num_threads(previous_threads)

    def _measure(self, settings: Mapping[str, Any], device: torch.device, seed: int) -> dict[str, Any]:
        panel, batch = settings["panel"], settings["batch_size"]
        sizes = panel_sizes(panel, settings["max_outputs"], settings["max_depth"])
        names = list(optim.OPTIMIZERS)
        generator = torch.Generator().manual_seed(seed)
        metrics: dict[str, Any] = {"sizes": sizes, "params": [], "torch_threads": torch.get_num_threads()}
        if device.type == "cuda":
            metrics["gpu"] = torch.cuda.get_device_name(device)
        for size in sizes:
            classes = size if panel == "a" else OUTPUTS_B
            x = torch.randn(batch, INPUTS, generator=generator).to(device)
            y = torch.randint(classes, (batch,), generator=generator).to(device)
            plain, extended = twin_models(lambda: panel_network(panel, size), seed, device)
            metrics["params"].append(sum(p.numel() for p in plain.parameters()))
            tasks = update_tasks(plain, extended, x, y, names)
            times = timing.interleaved(
                tasks, settings["updates"], settings["warmup"], generator, device, settings["clock"]
            )
            for name in names:
                stats = timing.summary(times[name])
                metrics.setdefault(f"times_s/{name}", []).append(times[name])
                for stat, value in stats.items():
                    metrics.setdefault(f"{stat}_s/{name}", []).append(value)
            del plain, extended, tasks  # free this network and its optimizer states before the next one
        return metrics

    def plot(self, df: pd.DataFrame, spec, outdir: Path) -> list[Path]:
        ok = df[df["status"] == "ok"]
        if ok.empty:
            return []
        paths = []
        for panel, rows in ok.groupby("panel"):
            paths += save_figure(panel_figure(panel, rows), outdir, f"{spec.name}{panel}")
        device = ok["device"].iloc[0]
        if "gpu" in ok and isinstance(ok["gpu"].iloc[0], str):
            device += f" ({ok['gpu'].iloc[0]})"
        caption = (
            f"Update time / Adam's (medians of {int(ok['updates'].iloc[0])} updates; "
            f"{device}, {int(ok['torch_threads'].iloc[0])} torch thread(s), clock {ok['clock'].iloc[0]})"
        )
        tables = [ratio_table(panel, rows).to_markdown(index=False) for panel, rows in ok.groupby("panel")]
        paths.append(save_markdown(caption + "\n\n" + "\n\n".join(tables) + "\n", outdir, spec.name))
        return paths


def medians(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per optimizer, the median update time of each network, median over the runs in ``rows``."""
    return {name: np.median(np.array(rows[f"median_s/{name}"].tolist()), axis=0) for name in optim.OPTIMIZERS}


def ratio_table(panel: str, ok: pd.DataFrame) -> pd.DataFrame:
    """One row per (batch size, network) of ``panel``: parameters, Adam's median time (ms) and
    every other optimizer's median time divided by Adam's."""
    rows = []
    for batch, runs in ok.groupby("batch_size"):
        med = medians(runs)
        for i, (size, params) in enumerate(zip(runs["sizes"].iloc[0], runs["params"].iloc[0], strict=True)):
            row = {"batch": batch, "outputs" if panel == "a" else "depth": size, "params": f"{params:,}"}
            row["adam ms"] = round(1e3 * med["adam"][i], 3)
            row |= {name: round(med[name][i] / med["adam"][i], 2) for name in optim.OPTIMIZERS if name != "adam"}
            rows.append(row)
    return pd.DataFrame(rows)


def panel_figure(panel: str, rows: pd.DataFrame) -> figure.Figure:
    """Per batch size: update time vs parameters (log-log, median and quartiles) and the ratio to Adam."""
    batches = sorted(rows["batch_size"].unique())
    fig = figure.Figure(figsize=(10, 3.6 * len(batches)), layout="constrained")
    axes = fig.subplots(len(batches), 2, squeeze=False)
    for (ax_time, ax_ratio), batch in zip(axes, batches, strict=True):
        runs = rows[rows["batch_size"] == batch]
        params = np.array(runs["params"].iloc[0])
        med = medians(runs)
        for name in optim.OPTIMIZERS:
            (line,) = ax_time.plot(params, med[name], marker="o", ms=3, label=name)
            q25 = np.median(np.array(runs[f"q25_s/{name}"].tolist()), axis=0)
            q75 = np.median(np.array(runs[f"q75_s/{name}"].tolist()), axis=0)
            ax_time.fill_between(params, q25, q75, color=line.get_color(), alpha=0.2, lw=0)
            ax_ratio.plot(params, med[name] / med["adam"], marker="o", ms=3, color=line.get_color())
        for name, ratio in PAPER_RATIOS.items():
            ax_ratio.axhline(ratio, color="grey", lw=0.6, ls=":")
            ax_ratio.annotate(  # right of the axes, where no curve runs
                f"paper {name} ≈ {ratio:g}", (1.01, ratio), xycoords=("axes fraction", "data"),
                fontsize=6, color="grey", ha="left", va="center", annotation_clip=False,
            )  # fmt: skip
        ax_time.set(xscale="log", yscale="log", xlabel="number of parameters", ylabel="update time (s)")
        ax_ratio.set(xscale="log", xlabel="number of parameters", ylabel="update time / Adam's")
        ax_time.set_title(f"figure 8({panel}), batch size {batch}: median, quartiles shaded", fontsize=9)
        ax_ratio.set_title("ratio of medians to Adam (dotted: the paper's averages)", fontsize=9)
    axes[0][0].legend(fontsize=7, ncol=2)
    return fig
