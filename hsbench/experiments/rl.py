"""Kinds ``rl-performance``, ``rl-robustness`` and ``rl-stability``: A2C or PPO on a MuJoCo task.

One run trains ``algorithm`` (``hsbench.rl.ppo`` or ``hsbench.rl.a2c``) on the gymnasium MuJoCo
v5 task ``env`` for ``total_steps`` environment steps (0: the paper's budget, 10M for Humanoid
and HumanoidStandup, 2M for the others; PPO rounds down to whole rollouts of 2048 steps) with
``optimizer`` at step size ``lr``, one optimizer per network, ε = 1e-5. The scaled optimizers
(``scaled-adahesscale``, ``scaled-adam``; Algorithm 3) use the trust-region radius
``trust_region`` and ``trust_region_bias_correction``; the other optimizers ignore both.

Metrics are those of ``hsbench.rl.training`` (``episode_steps``, ``episode_returns``,
``episode_lengths``, ``eta_steps``, ``eta_actor``, ``eta_critic``, ``diverged_at_step``,
``diverged``), with its ``time_s`` split into ``time_env_s``, ``time_policy_s`` and
``time_update_s``. A run whose loss or update became non-finite stops there and is recorded
``diverged`` with the step in ``diverged_at_step``. Runs checkpoint through the run context
and resume to the same returns. RL runs on the CPU, in one thread (the networks are 2×64 MLPs):
the kinds declare ``devices = ("cpu",)``, so ``hsbench run --device cuda`` stops with one line
before anything runs. A long run prints a line with its progress every minute.

Figures (stored results only). Returns are put on a common step grid: the mean undiscounted
return of the episodes that ended in each of ``BINS`` equal intervals of the run's steps, an
interval without an episode end repeating the previous value (:func:`binned_returns`). A run is
summarised by ``summary`` (plots only): ``mean``, the mean of its binned curve over the whole run
(area under the curve over its length), or ``final``, the mean over the last 10 % of the bins.

* ``rl-performance`` (figures 5, 10): one panel per (algorithm, environment): mean ± standard
  error over seeds of the binned return against environment steps, for each optimizer at its
  best step size, the one with the highest summary averaged over seeds (a step size with a
  diverged seed ranks last); table ``<spec>-best.md``.
* ``rl-robustness`` (figures 6, 11–13): one panel per (algorithm, environment): each optimizer's
  mean summary over seeds against the step size (log), normalized to [0, 1] between the lowest
  and highest such mean over all optimizers and step sizes of the panel, ± standard error
  (scaled alike). A diverged run counts as the lowest run summary of its panel, so a step size
  whose seeds all diverged sits at 0. ``<spec>-eta``: mean η (actor and critic) per step size,
  which explains flat lines: with a small Δ, η < 1 scales the step to one that no longer depends
  on the step size; table ``<spec>.md`` with both.
* ``rl-stability`` (figure 7): one panel per (algorithm, environment), every run's binned
  return as its own line, one colour per optimizer; table ``<spec>-runs.md`` with each run's
  peak (the best mean over 10 % of the bins in a row), final (the last 10 %) and the drop
  between them.
"""

from __future__ import annotations

import math
import sys
import time
from abc import abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hsbench.engine.kind import Diverged, ExperimentKind, Field
from hsbench.experiments.lazy import a2c, figure, np, pd, ppo, torch
from hsbench.experiments.names import OPTIMIZERS
from hsbench.experiments.plotting import save_figure, save_markdown

ALGORITHMS = {"ppo": ppo, "a2c": a2c}
"""``algorithm`` setting -> its module in hsbench.rl, whose ``train`` runs it."""
ENVIRONMENTS = (
    "Ant-v5", "Walker2d-v5", "HalfCheetah-v5", "Hopper-v5", "InvertedDoublePendulum-v5",  # figures 5, 6, 11
    "InvertedPendulum-v5", "Swimmer-v5", "Reacher-v5", "Humanoid-v5", "HumanoidStandup-v5",  # figures 10, 12, 13
)  # fmt: skip
LONG_ENVIRONMENTS = ("Humanoid-v5", "HumanoidStandup-v5")  # 10M steps in the paper, the others 2M
SUMMARIES = ("mean", "final")
BINS = 100  # points of the common step grid of the return curves
FINAL_FRACTION = 0.1  # ``final``: the last 10 % of the bins
PROGRESS_EVERY_S = 60.0
COLORS = {"adahesscale": "C0", "adam": "C1", "adahessian": "C2", "scaled-adahesscale": "C3", "scaled-adam": "C4"}


class RLTraining(ExperimentKind):
    """The run shared by the three RL kinds; subclasses draw their figures."""

    devices = ("cpu",)  # 2x64 networks: hsbench run --device cuda is rejected before anything runs

    fields: Mapping[str, Field] = {
        "algorithm": Field(str, "ppo or a2c (hsbench.rl)", choices=tuple(ALGORITHMS)),
        "env": Field(str, "gymnasium MuJoCo v5 task", choices=ENVIRONMENTS),
        "optimizer": Field(str, "optimizer of actor and critic (hsbench.optim)", choices=OPTIMIZERS),
        "lr": Field(float, "step size", low=0.0),
        "total_steps": Field(
            int, "environment steps; 0: the paper's (10M Humanoid, HumanoidStandup; else 2M)", default=0, low=0
        ),
        "trust_region": Field(
            float, "trust-region radius Δ of the scaled optimizers (others ignore it)", default=1e-8, low=1e-300
        ),
        "trust_region_bias_correction": Field(
            bool, "scaled optimizers: bias-correct the HesScale second moment in η (others ignore it)", default=True
        ),
        "summary": Field(
            str,
            "a run's return summary: mean over the run or over its final 10 % (plots only)",
            default="mean",
            choices=SUMMARIES,
        ),
    }

    def run(self, settings: Mapping[str, Any], ctx) -> dict[str, Any]:
        options = {}
        if settings["optimizer"].startswith("scaled-"):
            options = {k: settings[k] for k in ("trust_region", "trust_region_bias_correction")}
        total = resolved_steps(settings)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # 2x64 networks: more threads only contend (10x slower on a busy machine)
        try:
            found = ALGORITHMS[settings["algorithm"]].train(
                settings["env"], settings["optimizer"], settings["lr"], ctx.seed, total,
                optimizer_options=options, ctx=ctx, progress=Progress(run_label(settings), total),
            )  # fmt: skip
        finally:
            torch.set_num_threads(threads)
        clock = found.pop("time_s")
        metrics = found | {f"time_{part}_s": seconds for part, seconds in clock.items()}
        if metrics["diverged_at_step"] is not None:
            raise Diverged(f"step {metrics['diverged_at_step']}: {metrics['diverged']}", metrics)
        return metrics

    def plot(self, df: pd.DataFrame, spec, outdir: Path) -> list[Path]:
        runs = df[df["status"] != "failed"]
        if runs.empty:
            return []
        runs = with_curves(runs)
        scale, summary = runs["scale"].iloc[0], runs["summary"].iloc[0]
        caption = f"{spec.name} (scale {scale}): undiscounted episodic return; summary '{summary}'"
        return self.figures(runs, spec.name, caption, outdir)

    @abstractmethod
    def figures(self, runs: pd.DataFrame, name: str, caption: str, outdir: Path) -> list[Path]:
        """Draw the kind's figures from ``runs`` (with ``with_curves``' columns); return their paths."""


class RLPerformance(RLTraining):
    name = "rl-performance"
    description = "A2C/PPO on MuJoCo: return curves at each optimizer's best step size (figures 5, 10)"

    def figures(self, runs, name, caption, outdir):
        best = best_step_sizes(runs)
        keys = [*CURVE, "lr"]
        chosen = runs.merge(best[keys], on=keys)
        text = f"# {caption}\n\nBest step size per optimizer (highest summary averaged over seeds).\n\n"
        text += markdown_table(best[[*CURVE, "lr", "score", "seeds", "diverged"]])
        return [
            *save_figure(curves_figure(chosen, caption, spread=True), outdir, name),
            save_markdown(text, outdir, f"{name}-best"),
        ]


class RLRobustness(RLTraining):
    name = "rl-robustness"
    description = "step-size robustness of the scaled optimizers with A2C/PPO on MuJoCo (figures 6, 11-13)"

    def figures(self, runs, name, caption, outdir):
        scores = normalized_scores(runs)
        eta = eta_table(runs)
        text = f"# {caption}\n\nNormalized summary per step size (0: lowest, 1: highest of the panel).\n\n"
        text += markdown_table(scores[[*CURVE, "lr", "mean", "se", "normalized", "normalized_se", "seeds", "diverged"]])
        text += "\n\nMean η per step size (actor, critic), over updates and seeds.\n\n" + markdown_table(eta)
        return [
            *save_figure(robustness_figure(scores, caption), outdir, name),
            *save_figure(eta_figure(eta, caption), outdir, f"{name}-eta"),
            save_markdown(text, outdir, name),
        ]


class RLStability(RLTraining):
    name = "rl-stability"
    description = "every run's return curve over a long run, Adam vs Scaled Adam (simulated figure 7)"

    def figures(self, runs, name, caption, outdir):
        table = runs.assign(
            peak=runs["curve"].map(peak),
            final=[summarize(c, "final") for c in runs["curve"]],
        ).assign(drop=lambda t: t["peak"] - t["final"])
        text = f"# {caption}\n\nEvery run: peak (best 10 % window of the step grid) and final (last 10 %) return.\n\n"
        text += markdown_table(
            table[[*CURVE, "lr", "seed", "status", "peak", "final", "drop"]].sort_values([*CURVE, "seed"])
        )
        return [
            *save_figure(curves_figure(runs, caption, spread=False), outdir, name),
            save_markdown(text, outdir, f"{name}-runs"),
        ]


CURVE = ["algorithm", "env", "optimizer"]  # what one line of a figure is, besides the step size


def resolved_steps(settings: Mapping[str, Any]) -> int:
    """The run's environment steps, the paper's budget filling in 0."""
    if settings["total_steps"]:
        return int(settings["total_steps"])
    return 10_000_000 if settings["env"] in LONG_ENVIRONMENTS else 2_000_000


def run_label(settings: Mapping[str, Any]) -> str:
    what = " ".join(settings[k] for k in ("algorithm", "env", "optimizer"))
    return f"{what} lr={settings['lr']:g} seed={settings['seed']}"


class Progress:
    """``progress(step)`` callback printing one line to stderr at most every ``PROGRESS_EVERY_S``,
    with the speed since the previous line."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.last: tuple[int, float] | None = None  # (step, time) of the last line (or first call)

    def __call__(self, step: int) -> None:
        now = time.monotonic()
        if self.last is None:
            self.last = (step, now)
        elif now - self.last[1] >= PROGRESS_EVERY_S:
            rate = (step - self.last[0]) / (now - self.last[1])
            print(f"{self.label}: {step:,}/{self.total:,} steps ({100 * step / self.total:.0f} %), {rate:.0f} steps/s",
                  file=sys.stderr, flush=True)  # fmt: skip
            self.last = (step, now)


# -- return curves and summaries ---------------------------------------------------------------


def binned_returns(steps, returns, total_steps: int, end: int | None = None, bins: int = BINS) -> np.ndarray:
    """Return curve on a grid of ``bins`` equal intervals of [0, total_steps], shape (bins,).

    Entry i is the mean return of the episodes whose last step lies in ((i) w, (i + 1) w],
    w = total_steps / bins; an interval without an episode end repeats the previous entry (NaN
    before the first episode). Intervals that begin at or after ``end`` (a diverged run's step)
    are NaN."""
    edges = np.linspace(0, total_steps, bins + 1)
    steps, returns = np.asarray(steps, dtype=float), np.asarray(returns, dtype=float)
    which = np.clip(np.searchsorted(edges, steps, side="left") - 1, 0, bins - 1)
    sums = np.bincount(which, weights=returns, minlength=bins)[:bins]
    counts = np.bincount(which, minlength=bins)[:bins]
    curve = np.full(bins, np.nan)
    last = np.nan
    for i in range(bins):
        if counts[i]:
            last = sums[i] / counts[i]
        curve[i] = last
    if end is not None:
        curve[edges[:-1] >= end] = np.nan
    return curve


def summarize(curve: np.ndarray, summary: str) -> float:
    """``mean``: mean of the binned curve (its NaN entries left out); ``final``: the same over
    its last ``FINAL_FRACTION`` of the bins. NaN if no entry is finite."""
    if summary == "final":
        curve = curve[-max(1, math.ceil(FINAL_FRACTION * len(curve))) :]
    elif summary != "mean":
        raise ValueError(f"unknown summary {summary!r}; choose from {', '.join(SUMMARIES)}")
    finite = curve[np.isfinite(curve)]
    return float(finite.mean()) if len(finite) else math.nan


def peak(curve: np.ndarray) -> float:
    """The highest mean of the binned curve over ``FINAL_FRACTION`` of its bins in a row (the
    window ``summarize(curve, "final")`` averages last), NaN entries left out."""
    k = max(1, math.ceil(FINAL_FRACTION * len(curve)))
    windows = np.lib.stride_tricks.sliding_window_view(curve, k)
    counts = np.isfinite(windows).sum(1)
    sums = np.where(np.isfinite(windows), windows, 0.0).sum(1)
    return float(np.max(sums[counts > 0] / counts[counts > 0])) if counts.any() else math.nan


def with_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` plus ``total`` (resolved steps), ``curve`` (``binned_returns``) and ``value``
    (``summarize`` by the run's ``summary``; NaN for a diverged run)."""
    total = [resolved_steps(row) for row in runs.to_dict("records")]
    curves = [
        binned_returns(s, r, t, None if pd.isna(d) else int(d))
        for s, r, t, d in zip(
            runs["episode_steps"], runs["episode_returns"], total, runs["diverged_at_step"], strict=True
        )
    ]
    values = [
        math.nan if st == "diverged" else summarize(c, m)
        for c, st, m in zip(curves, runs["status"], runs["summary"], strict=True)
    ]
    return runs.assign(total=total, curve=curves, value=values)


def config_scores(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (algorithm, env, optimizer, lr): ``score``, the mean ``value`` over seeds
    (-inf if a seed diverged), and the ``seeds`` and ``diverged`` counts."""
    scored = runs.assign(
        score=np.where(runs["status"] == "diverged", -math.inf, runs["value"]),
        is_diverged=runs["status"] == "diverged",
    )
    return (
        scored.groupby([*CURVE, "lr"], as_index=False)
        .agg(score=("score", "mean"), seeds=("seed", "count"), diverged=("is_diverged", "sum"))
        .sort_values([*CURVE, "lr"])
        .reset_index(drop=True)
    )


def best_step_sizes(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (algorithm, env, optimizer) the row of ``config_scores`` with the highest score (the
    smaller step size on a tie; a step size with a diverged seed is chosen only if all have one)."""
    scores = config_scores(runs)
    best = scores.sort_values(["score", "lr"], ascending=[False, True], kind="stable").groupby(CURVE).head(1)
    return best.sort_values(CURVE).reset_index(drop=True)


def normalized_scores(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (algorithm, env, optimizer, lr): ``mean`` and standard error ``se`` of the run
    values over seeds, a diverged run (or one without a finished episode) counting as the lowest
    finite value of its panel (algorithm, env); ``normalized`` = (mean − lo) / (hi − lo) with lo,
    hi the lowest and highest ``mean`` of the panel (0 where hi = lo), ``normalized_se`` =
    se / (hi − lo); ``seeds``, ``diverged``."""
    rows = []
    for _, panel in runs.groupby(["algorithm", "env"], sort=True):
        finite = panel["value"][np.isfinite(panel["value"])]
        lowest = finite.min() if len(finite) else 0.0
        values = panel.assign(value=panel["value"].fillna(lowest))  # a diverged run's value is NaN
        stats = (
            values.assign(is_diverged=values["status"] == "diverged")
            .groupby([*CURVE, "lr"], as_index=False)
            .agg(mean=("value", "mean"), sd=("value", "std"), seeds=("value", "count"), diverged=("is_diverged", "sum"))
        )
        stats["se"] = (stats["sd"] / np.sqrt(stats["seeds"])).fillna(0.0)
        lo, hi = stats["mean"].min(), stats["mean"].max()
        span = hi - lo
        stats["normalized"] = (stats["mean"] - lo) / span if span > 0 else 0.0
        stats["normalized_se"] = stats["se"] / span if span > 0 else 0.0
        rows.append(stats.drop(columns="sd"))
    return pd.concat(rows).sort_values([*CURVE, "lr"]).reset_index(drop=True)


def eta_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (algorithm, env, optimizer, lr) of the scaled runs: η of actor and critic averaged over
    each run's records, then over its runs (diverged runs up to their divergence)."""
    scaled = runs[runs["eta_actor"].map(len) > 0]
    means = scaled.assign(eta_actor=scaled["eta_actor"].map(np.mean), eta_critic=scaled["eta_critic"].map(np.mean))
    return means.groupby([*CURVE, "lr"], as_index=False)[["eta_actor", "eta_critic"]].mean()


# -- figures -----------------------------------------------------------------------------------


def panel_axes(keys: list[tuple[str, str]], width: float = 4.0, height: float = 3.2):
    """A figure with one row per algorithm and one column per environment; {(algorithm, env): ax}."""
    algorithms = sorted({a for a, _ in keys})
    envs = list(dict.fromkeys(e for _, e in sorted(keys, key=lambda k: ENVIRONMENTS.index(k[1]))))
    fig = figure.Figure(figsize=(max(8.0, width * len(envs) + 0.5), height * len(algorithms) + 1.0))
    axes = fig.subplots(len(algorithms), len(envs), squeeze=False)
    found = {}
    for i, algorithm in enumerate(algorithms):
        for j, env in enumerate(envs):
            ax = axes[i][j]
            if (algorithm, env) in keys:
                ax.set_title(f"{algorithm.upper()} {env}", fontsize="small")
                found[(algorithm, env)] = ax
            else:
                ax.set_visible(False)
    return fig, found


def curves_figure(runs: pd.DataFrame, caption: str, spread: bool) -> figure.Figure:
    """Binned return against environment steps per panel: the mean ± standard error over seeds of
    each (optimizer, lr) (``spread``), or every run as its own line."""
    fig, axes = panel_axes(sorted(set(zip(runs["algorithm"], runs["env"], strict=True))))
    for (algorithm, env), ax in axes.items():
        here = runs[(runs["algorithm"] == algorithm) & (runs["env"] == env)]
        for (optimizer, lr), group in here.groupby(["optimizer", "lr"], sort=True):
            curves = np.array(group["curve"].tolist())  # runs x BINS
            x = np.linspace(0, group["total"].iloc[0], BINS + 1)[1:]
            color = COLORS.get(optimizer)
            label = f"{optimizer} (lr={lr:g})"
            if spread:
                mean, se = mean_se(curves)
                diverged = int((group["status"] == "diverged").sum())
                (line,) = ax.plot(x, mean, color=color, label=label + (f", {diverged} diverged" if diverged else ""))
                ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.25)
            else:
                for k, curve in enumerate(curves):
                    ax.plot(x, curve, color=color, lw=1.0, alpha=0.8, label=label if k == 0 else None)
        ax.set(xlabel="environment steps", ylabel="return")
        ax.legend(fontsize="x-small")
    what = "mean ± standard error over seeds, best step size per optimizer" if spread else "every run its own line"
    fig.suptitle(f"{caption}\n{what}", fontsize="small")
    fig.tight_layout()
    return fig


def mean_se(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over the rows of ``curves`` (runs, bins), NaN entries left out:
    the mean is NaN where a column has no finite entry, the standard error 0 where it has one."""
    finite = np.isfinite(curves)
    counts = finite.sum(0)
    mean = np.divide(np.where(finite, curves, 0.0).sum(0), counts, out=np.full(counts.shape, np.nan), where=counts > 0)
    squares = np.where(finite, (curves - mean) ** 2, 0.0).sum(0)
    variance = np.divide(squares, counts - 1, out=np.zeros(counts.shape), where=counts > 1)
    return mean, np.sqrt(variance / np.maximum(counts, 1))


def robustness_figure(scores: pd.DataFrame, caption: str) -> figure.Figure:
    """Normalized summary ± standard error against the step size (log x), one line per optimizer."""
    fig, axes = panel_axes(sorted(set(zip(scores["algorithm"], scores["env"], strict=True))), width=3.6)
    for (algorithm, env), ax in axes.items():
        here = scores[(scores["algorithm"] == algorithm) & (scores["env"] == env)]
        for optimizer, points in here.groupby("optimizer", sort=True):
            (line,) = ax.plot(
                points["lr"], points["normalized"], marker="o", color=COLORS.get(optimizer), label=optimizer
            )
            se = points["normalized_se"]
            ax.fill_between(
                points["lr"], points["normalized"] - se, points["normalized"] + se, color=line.get_color(), alpha=0.25
            )
            diverged = points[points["diverged"] > 0]
            ax.plot(diverged["lr"], diverged["normalized"], "x", color="k", ms=8)
        ax.set(xscale="log", ylim=(-0.05, 1.05), xlabel="step size", ylabel="normalized return")
        ax.legend(fontsize="x-small")
    fig.suptitle(
        f"{caption}\nnormalized per panel over all optimizers and step sizes\n"
        "x: a seed diverged (counted as the panel's lowest)",
        fontsize="small",
    )
    fig.tight_layout()
    return fig


def eta_figure(eta: pd.DataFrame, caption: str) -> figure.Figure:
    """Mean η against the step size (log-log): actor solid, critic dashed, one colour per optimizer."""
    if eta.empty:
        fig = figure.Figure(figsize=(5, 2))
        fig.text(0.5, 0.5, "no run of a scaled optimizer", ha="center")
        return fig
    fig, axes = panel_axes(sorted(set(zip(eta["algorithm"], eta["env"], strict=True))), width=3.6)
    for (algorithm, env), ax in axes.items():
        here = eta[(eta["algorithm"] == algorithm) & (eta["env"] == env)]
        for optimizer, points in here.groupby("optimizer", sort=True):
            color = COLORS.get(optimizer)
            (line,) = ax.plot(points["lr"], points["eta_actor"], marker="o", color=color, label=f"{optimizer} actor")
            ax.plot(
                points["lr"],
                points["eta_critic"],
                marker="s",
                ls="--",
                color=line.get_color(),
                label=f"{optimizer} critic",
            )
        ax.set(xscale="log", yscale="log", xlabel="step size", ylabel="mean η")
        ax.legend(fontsize="x-small")
    fig.suptitle(f"{caption}\nstep-size scale η = min(1, √(2Δ/h)), mean over updates and seeds", fontsize="small")
    fig.tight_layout()
    return fig


def markdown_table(table: pd.DataFrame) -> str:
    """``table`` as a markdown table, numbers with 4 significant digits."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"
