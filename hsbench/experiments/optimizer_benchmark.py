"""Kind ``optimizer-benchmark``: train a DeepOBS test problem with one optimizer and step size.

One run trains ``problem`` (``hsbench.problems``) for its epochs with ``optimizer`` at step
size ``lr`` (and ``beta1``, ``beta2`` for the Adam-style optimizers; SGD ignores them) and
evaluates, before training and after every epoch as DeepOBS does, the loss and accuracy on the
train-eval, validation and test sets (lists of epochs + 1 values: ``train_loss``,
``train_acc``, ``valid_loss``, ``valid_acc``, ``test_loss``, ``test_acc``) and the training
time so far (``time_s``: seconds spent in training steps, evaluation excluded, measured on the
device). Losses are DeepOBS's: mean cross-entropy plus the L2 term. ``data`` names the data
that was used.

The network's initial weights depend on the run's seed only, so every optimizer starts from
the same weights under the same seed. A non-finite training loss stops the run as
``diverged``. Checkpoints (model, optimizer, RNG states, metrics) are taken at epoch ends.

Data are read from the run context's data directory (``hsbench run --data-dir``; default
``data``) and trained on its device (``--device``; default: CUDA when available), which the
run's record stores.

Plots (stored results only): for each optimizer the configuration (step size, betas) whose
validation losses are best by ``selection`` — ``final-valid-loss`` or ``valid-loss-auc`` (the
area under the validation-loss curve, the workshop paper's criterion); a diverged seed ranks
its configuration last. ``<spec>``: mean test accuracy ± standard error over seeds against
epochs and against training seconds (the paper's figure 4); ``<spec>-step-sizes``: mean
final test loss against the step size, best betas per step size (figure 9).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hsbench.data import TORCHVISION
from hsbench.engine.kind import Diverged, ExperimentKind, Field
from hsbench.experiments.lazy import F, curvature, figure, np, optim, pd, problems, timing, torch
from hsbench.experiments.names import ACTIVATIONS, OPTIMIZERS, PROBLEMS
from hsbench.experiments.plotting import save_figure

EVAL_BATCH = 1000  # evaluation batch size (does not change the numbers, only memory and speed)
SPLITS = ("train_eval", "valid", "test")
SERIES = ("train_loss", "train_acc", "valid_loss", "valid_acc", "test_loss", "test_acc", "time_s")
HYPER = ("lr", "beta1", "beta2")  # searched hyperparameters; the other settings identify the curve
SELECTIONS = ("final-valid-loss", "valid-loss-auc")
DEEPOBS_CURVES = (
    ("train_loss", "train_losses"),
    ("valid_loss", "valid_losses"),
    ("test_loss", "test_losses"),
    ("train_acc", "train_accuracies"),
    ("valid_acc", "valid_accuracies"),
    ("test_acc", "test_accuracies"),
)
"""Our metric and DeepOBS's name for it in its per-seed JSON (``export --format deepobs``)."""


class OptimizerBenchmark(ExperimentKind):
    name = "optimizer-benchmark"
    description = "train a DeepOBS problem with one optimizer and step size; learning curves, best step size"
    export_formats = ("deepobs",)  # hsbench export --format deepobs: DeepOBS's per-seed JSON layout
    fields: Mapping[str, Field] = {
        "problem": Field(str, "test problem (hsbench.problems)", choices=PROBLEMS),
        "activation": Field(str, "activation of every hidden layer", default="relu", choices=ACTIVATIONS),
        "optimizer": Field(str, "optimizer (hsbench.optim)", choices=OPTIMIZERS),
        "lr": Field(float, "step size", low=0.0),
        "beta1": Field(float, "first-moment decay (ignored by sgd)", default=0.9, low=0.0, high=0.999999),
        "beta2": Field(float, "second-moment decay (ignored by sgd)", default=0.999, low=0.0, high=0.999999),
        "epochs": Field(int, "training epochs; 0: the problem's default", default=0, low=0),
        "batch_size": Field(int, "training batch size; 0: the problem's default", default=0, low=0),
        "selection": Field(
            str,
            "criterion choosing each optimizer's best configuration (plots only)",
            default="final-valid-loss",
            choices=SELECTIONS,
        ),
    }

    def required_data(self, settings: Mapping[str, Any]) -> list[str]:
        dataset = problems.get(settings["problem"]).dataset
        return [dataset] if dataset in TORCHVISION else []

    def run(self, settings: Mapping[str, Any], ctx) -> dict[str, Any]:
        problem = problems.get(settings["problem"])
        epochs, batch_size = resolved(settings)
        device = torch.device(ctx.device)
        data = problem.data(ctx.seed, ctx.data_dir).to(device)
        torch.manual_seed(ctx.seed)  # initial weights from the seed alone: the same for every optimizer
        model = problem.model(settings["activation"]).to(device)
        loss_fn = problem.loss_fn()
        hyper = {"lr": settings["lr"]}
        if settings["optimizer"] != "sgd":
            hyper["betas"] = (settings["beta1"], settings["beta2"])
        opt = optim.make(settings["optimizer"], problem.param_groups(model), **hyper)
        if opt.needs_recording:
            curvature.extend(model)
            curvature.extend(loss_fn)
        generator = torch.Generator().manual_seed(ctx.seed)  # shuffling and augmentation
        metrics: dict[str, Any] = {name: [] for name in SERIES} | {"data": data.description}

        state = ctx.load_checkpoint()
        if state is not None:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            metrics = state["metrics"]
        else:
            record(metrics, evaluate(model, problem, data), 0.0)
        for epoch in range(len(metrics["time_s"]), epochs + 1):
            seconds = train_epoch(model, loss_fn, opt, data, batch_size, generator, metrics, epoch)
            record(metrics, evaluate(model, problem, data), metrics["time_s"][-1] + seconds)
            if ctx.checkpoint_due():
                ctx.save_checkpoint(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "generator": generator.get_state(),
                        "torch_rng": torch.get_rng_state(),
                        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                        "metrics": metrics,
                    }
                )
        return metrics

    def plot(self, df: pd.DataFrame, spec, outdir: Path) -> list[Path]:
        runs = df[df["status"] != "failed"]
        if runs.empty:
            return []
        selection = runs["selection"].iloc[0]
        best = best_configs(runs, selection)
        chosen = runs.merge(best[self.curve_keys() + list(HYPER)], on=self.curve_keys() + list(HYPER))
        caption = (
            f"{spec.name} (scale {runs['scale'].iloc[0]}); data: {'; '.join(sorted(runs['data'].dropna().unique()))}"
        )
        outdir.mkdir(parents=True, exist_ok=True)
        table = outdir / f"{spec.name}-best.csv"
        best.to_csv(table, index=False)
        return [
            *save_figure(_curves_figure(chosen, caption, selection), outdir, spec.name),
            *save_figure(_step_size_figure(runs, selection, caption), outdir, f"{spec.name}-step-sizes"),
            table,
        ]

    def export(self, df: pd.DataFrame, spec, fmt: str, outdir: Path) -> Path:
        """Write runs in DeepOBS's layout under ``outdir`` (``fmt`` must be 'deepobs'); return ``outdir``."""
        if fmt != "deepobs":
            raise ValueError(f"{self.name} exports the formats csv, parquet and deepobs; got {fmt!r}")
        shutil.rmtree(outdir, ignore_errors=True)  # an earlier export's time-stamped files would count twice
        write_deepobs(df[df["status"] != "failed"], outdir)
        return outdir

    def curve_keys(self) -> list[str]:
        """Settings that identify one curve (all but the searched hyperparameters)."""
        return [f for f in self.fields if f not in HYPER]


def resolved(settings: Mapping[str, Any]) -> tuple[int, int]:
    """(epochs, batch size) of a run, the problem's defaults filling in zeros."""
    problem = problems.get(settings["problem"])
    return int(settings["epochs"] or problem.epochs), int(settings["batch_size"] or problem.batch_size)


def train_epoch(model, loss_fn, opt, data, batch_size, generator, metrics, epoch) -> float:
    """One epoch of training steps; returns its seconds. Raises Diverged (with the metrics so far)
    on a non-finite loss or update."""
    model.train()
    seconds = 0.0
    for x, y in data.train_batches(batch_size, generator):
        timing.synchronize(x.device)
        start = time.perf_counter()
        try:
            optim.train_step(opt, model, loss_fn, x, y)
        except optim.Diverged as error:
            raise Diverged(f"epoch {epoch}: {error}", metrics) from error
        timing.synchronize(x.device)
        seconds += time.perf_counter() - start
    return seconds


def evaluate(model, problem, data) -> dict[str, tuple[float, float]]:
    """{split: (DeepOBS loss, accuracy)} on the train-eval, validation and test sets."""
    model.eval()
    found = {}
    with torch.no_grad():
        regularization = float(problem.regularization(model))
        for split in SPLITS:
            total, correct, count = 0.0, 0, 0
            for x, y in data.eval_batches(split, EVAL_BATCH):
                logits = model(x)
                total += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
                count += len(y)
            found[split] = (total / count + regularization, correct / count)
    model.train()
    return found


def record(metrics: dict[str, Any], evaluation: dict[str, tuple[float, float]], seconds: float) -> None:
    for split, prefix in zip(SPLITS, ("train", "valid", "test"), strict=True):
        loss, acc = evaluation[split]
        metrics[f"{prefix}_loss"].append(loss)
        metrics[f"{prefix}_acc"].append(acc)
    metrics["time_s"].append(seconds)


# -- selection ---------------------------------------------------------------------------------


def run_score(valid_loss: list[float], selection: str) -> float:
    """Score of one run (lower is better): the final validation loss or the area under the
    validation-loss curve (trapezoidal, per epoch); +inf for a diverged (short or non-finite) curve."""
    losses = np.asarray(valid_loss, dtype=float)
    if not np.all(np.isfinite(losses)):
        return math.inf
    if selection == "final-valid-loss":
        return float(losses[-1])
    if selection == "valid-loss-auc":
        return float(np.trapezoid(losses))
    raise ValueError(f"unknown selection {selection!r}; choose from {', '.join(SELECTIONS)}")


def config_scores(runs: pd.DataFrame, selection: str) -> pd.DataFrame:
    """One row per configuration (curve keys + lr, beta1, beta2): mean ``score`` over its seeds
    (+inf if any seed diverged), ``seeds`` and ``diverged`` counts, mean final ``test_loss``."""
    keys = OptimizerBenchmark().curve_keys() + list(HYPER)
    scored = runs.assign(
        score=[
            math.inf if status == "diverged" else run_score(curve, selection)
            for status, curve in zip(runs["status"], runs["valid_loss"], strict=True)
        ],
        final_test_loss=[
            c[-1] if s == "ok" else math.nan for s, c in zip(runs["status"], runs["test_loss"], strict=True)
        ],
        is_diverged=runs["status"] == "diverged",
    )
    return (
        scored.groupby(keys, as_index=False)
        .agg(
            score=("score", "mean"),
            seeds=("seed", "count"),
            diverged=("is_diverged", "sum"),
            test_loss=("final_test_loss", "mean"),
        )
        .sort_values(keys)
    )


def best_configs(runs: pd.DataFrame, selection: str) -> pd.DataFrame:
    """For each curve (problem, activation, optimizer, ...), the configuration with the lowest
    score; diverged configurations rank last (one is chosen only if all diverged)."""
    scores = config_scores(runs, selection)
    curve = OptimizerBenchmark().curve_keys()
    best = scores.sort_values(["score", *HYPER], kind="stable").groupby(curve, as_index=False).head(1)
    return best.sort_values(curve).reset_index(drop=True)


# -- figures -----------------------------------------------------------------------------------


def _label(row) -> str:
    return f"{row['problem']} ({row['activation']})"


def _curves_figure(chosen: pd.DataFrame, caption: str, selection: str) -> figure.Figure:
    """Per problem: mean test accuracy ± standard error against epochs and against seconds."""
    panels = sorted({(_label(r), r["problem"], r["activation"]) for _, r in chosen.iterrows()})
    fig = figure.Figure(figsize=(10, 3.6 * len(panels) + 0.6))
    axes = fig.subplots(len(panels), 2, squeeze=False)
    for (title, problem, activation), (by_epoch, by_time) in zip(panels, axes, strict=True):
        here = chosen[(chosen["problem"] == problem) & (chosen["activation"] == activation)]
        for optimizer, runs in here.groupby("optimizer", sort=True):
            if (runs["status"] != "ok").any():
                continue  # every configuration of this optimizer diverged
            acc = np.array(runs["test_acc"].tolist())  # seeds x (epochs + 1)
            mean = acc.mean(0)
            se = acc.std(0, ddof=1) / math.sqrt(len(acc)) if len(acc) > 1 else np.zeros_like(mean)
            seconds = np.array(runs["time_s"].tolist()).mean(0)
            row = runs.iloc[0]
            label = f"{optimizer} (lr={row['lr']:g}, β=({row['beta1']:g}, {row['beta2']:g}))"
            if optimizer == "sgd":
                label = f"sgd (lr={row['lr']:g})"
            for ax, x in ((by_epoch, np.arange(len(mean))), (by_time, seconds)):
                (line,) = ax.plot(x, mean, label=label)
                ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.25)
        by_epoch.set(title=title, xlabel="epoch", ylabel="test accuracy")
        by_time.set(title=title, xlabel="training time (s, measured)", ylabel="test accuracy")
        by_epoch.legend(fontsize="x-small")
    fig.suptitle(
        f"{caption}\nbest configuration per optimizer by {selection}; mean ± standard error over seeds",
        fontsize="small",
    )
    fig.tight_layout()
    return fig


def _step_size_figure(runs: pd.DataFrame, selection: str, caption: str) -> figure.Figure:
    """Per problem: mean final test loss against step size, one line per optimizer (best betas per step size)."""
    scores = config_scores(runs, selection)
    curve = OptimizerBenchmark().curve_keys()
    per_lr = (
        scores.sort_values(["score", "beta1", "beta2"], kind="stable").groupby([*curve, "lr"], as_index=False).head(1)
    )
    panels = sorted({(_label(r), r["problem"], r["activation"]) for _, r in per_lr.iterrows()})
    fig = figure.Figure(figsize=(max(8.0, 5.5 * len(panels)), 4.4))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, problem, activation) in zip(axes, panels, strict=True):
        here = per_lr[(per_lr["problem"] == problem) & (per_lr["activation"] == activation)]
        for optimizer, points in here.groupby("optimizer", sort=True):
            points = points.sort_values("lr")
            finite = points[points["diverged"] == 0]
            (line,) = ax.plot(finite["lr"], finite["test_loss"], marker="o", label=optimizer)
            diverged = points[points["diverged"] > 0]
            ax.plot(
                diverged["lr"],
                [1.0] * len(diverged),
                "x",
                color=line.get_color(),
                transform=ax.get_xaxis_transform(),
                clip_on=False,
            )
        ax.set(title=title, xscale="log", yscale="log", xlabel="step size", ylabel="final test loss (mean over seeds)")
        ax.legend(fontsize="x-small")
    fig.suptitle(f"{caption}\nbest betas per step size by {selection}; x on the top edge: diverged", fontsize="small")
    fig.tight_layout()
    return fig


# -- DeepOBS export ----------------------------------------------------------------------------


def _float2str(x: float) -> str:
    """DeepOBS's float formatting in folder names (``abstract_runner_utils.float2str``)."""
    mantissa, exponent = f"{x:.10e}".split("e")
    return mantissa.rstrip("0") + "e" + exponent


def write_deepobs(runs: pd.DataFrame, outdir: Path) -> list[Path]:
    """One DeepOBS output file per run:
    ``<problem>/<optimizer>/num_epochs__E__batch_size__B__<hyper>__<value>.../random_seed__S__<time>.json``
    with DeepOBS's keys. The problem folder gets an ``_<activation>`` suffix unless the activation
    is DeepOBS's ReLU. Diverged runs are padded with their initial values to ``num_epochs + 1``
    entries, as DeepOBS's runner does when it aborts a run."""
    stamp = time.strftime("%Y-%m-%d-%H-%M-%S")
    written = []
    for _, run in runs.iterrows():
        settings = run.to_dict()
        epochs, batch_size = resolved(settings)
        hyper = {"lr": run["lr"]} | (
            {} if run["optimizer"] == "sgd" else {"beta1": run["beta1"], "beta2": run["beta2"]}
        )
        folder = f"num_epochs__{epochs}__batch_size__{batch_size}" + "".join(
            f"__{name}__{_float2str(value)}" for name, value in sorted(hyper.items())
        )
        testproblem = run["problem"] if run["activation"] == "relu" else f"{run['problem']}_{run['activation']}"
        curves = {}
        for ours, theirs in DEEPOBS_CURVES:
            values = list(run[ours])
            curves[theirs] = values + [values[0]] * (epochs + 1 - len(values))
        output = {
            "testproblem": testproblem,
            "batch_size": batch_size,
            "num_epochs": epochs,
            "random_seed": int(run["seed"]),
            "weight_decay": problems.get(run["problem"]).weight_decay,
            "optimizer_name": run["optimizer"],
            "optimizer_hyperparams": hyper,
            "training_params": {},
            **curves,
            "wall_times_s": list(run["time_s"]),
            "status": run["status"],
            "device": run["device"],
        }
        path = outdir / testproblem / run["optimizer"] / folder / f"random_seed__{int(run['seed'])}__{stamp}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(output, indent=4))
        written.append(path)
    return written
