"""Toy kind ``quadratic``: minimise a random ill-conditioned quadratic with a torch optimizer.

f(x) = 1/2 (x - x*)^T A (x - x*), with A = Q diag(lambda) Q^T, Q a random rotation and the
eigenvalues lambda log-spaced in [1, condition]; x*, x0 and Q are drawn from the run's seed.
Gradients may carry Gaussian noise (``noise`` > 0) from a generator that is checkpointed,
so that a resumed run repeats an uninterrupted one exactly. Exercises the engine end to end
before the paper's experiment kinds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hsbench.engine.kind import Diverged, ExperimentKind, Field
from hsbench.experiments.lazy import figure, pd, torch

TORCH_OPTIMIZERS = {"adagrad": "Adagrad", "adam": "Adam", "rmsprop": "RMSprop", "sgd": "SGD"}
"""``optimizer`` setting -> class in torch.optim."""
DIVERGENCE_FACTOR = 1e8  # a loss this many times the initial one counts as diverged


class Quadratic(ExperimentKind):
    name = "quadratic"
    description = "minimise a random ill-conditioned quadratic with each optimizer"
    fields: Mapping[str, Field] = {
        "dim": Field(int, "dimension of x", default=10, low=1, high=10_000),
        "condition": Field(float, "largest / smallest eigenvalue of A", default=100.0, low=1.0),
        "optimizer": Field(str, "torch optimizer", default="sgd", choices=tuple(TORCH_OPTIMIZERS)),
        "lr": Field(float, "learning rate", default=0.01, low=1e-12),
        "steps": Field(int, "optimisation steps", default=200, low=1),
        "noise": Field(float, "standard deviation of the Gaussian gradient noise", default=0.0, low=0.0),
        "fail_at_step": Field(
            int, "raise an error at this step to test failure handling; -1: never", default=-1, low=-1
        ),
    }

    devices = ("cpu",)  # a 20-dimensional problem: the CPU only

    def run(self, settings: Mapping[str, Any], ctx) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(ctx.seed)
        dim = settings["dim"]
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        eigenvalues = torch.logspace(0, math.log10(settings["condition"]), dim, dtype=torch.float64)
        a = q @ torch.diag(eigenvalues) @ q.T
        x_star = torch.randn(dim, generator=gen, dtype=torch.float64)
        x = torch.randn(dim, generator=gen, dtype=torch.float64).requires_grad_()
        optimizer = getattr(torch.optim, TORCH_OPTIMIZERS[settings["optimizer"]])([x], lr=settings["lr"])

        def loss_fn() -> torch.Tensor:
            d = x - x_star
            return 0.5 * d @ a @ d

        losses: list[float] = []
        state = ctx.load_checkpoint()
        if state is not None:
            with torch.no_grad():
                x.copy_(state["x"])
            optimizer.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            losses = state["losses"]
        for step in range(len(losses), settings["steps"]):
            if step == settings["fail_at_step"]:
                raise RuntimeError(f"fail_at_step={step} reached")
            optimizer.zero_grad()
            loss = loss_fn()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]) or losses[-1] > DIVERGENCE_FACTOR * losses[0]:
                raise Diverged(f"loss {losses[-1]:.3g} at step {step}", {"loss": losses, "final_loss": losses[-1]})
            loss.backward()
            if settings["noise"] > 0:
                x.grad += settings["noise"] * torch.randn(dim, generator=gen, dtype=torch.float64)
            optimizer.step()
            if ctx.checkpoint_due():
                ctx.save_checkpoint(
                    {
                        "x": x.detach(),
                        "optimizer": optimizer.state_dict(),
                        "generator": gen.get_state(),
                        "losses": losses,
                    }
                )
        final = loss_fn().item()
        return {"loss": losses, "final_loss": final}

    def plot(self, df: pd.DataFrame, spec, outdir: Path) -> list[Path]:
        """One panel per optimizer: median loss over seeds against step, one line per learning rate."""
        ok = df[df["status"] != "failed"]
        optimizers = sorted(ok["optimizer"].unique())
        fig = figure.Figure(figsize=(4 * max(len(optimizers), 1), 3.2))
        axes = fig.subplots(1, max(len(optimizers), 1), squeeze=False)
        for ax, name in zip(axes[0], optimizers, strict=False):  # no optimizer: one empty panel
            for lr, group in ok[ok["optimizer"] == name].groupby("lr"):
                curves = pd.DataFrame(group["loss"].tolist()).T  # steps x seeds (shorter if diverged)
                ax.semilogy(curves.median(axis=1), label=f"lr={lr:g}")
            ax.set(title=name, xlabel="step", ylabel="loss")
            ax.legend(fontsize="small")
        fig.suptitle(spec.description or spec.name)
        fig.tight_layout()
        outdir.mkdir(parents=True, exist_ok=True)
        path = outdir / f"{spec.name}.png"
        fig.savefig(path, dpi=120)
        return [path]
