"""``make bench`` (``python -m hsbench.bench``): the cost of every curvature backward pass and of
every optimizer's update, side by side in one process, as one table.

* ``backward``: on the MLP 64-512-512-100 (tanh, cross-entropy) at batch size 1, forward pass
  plus backward pass of each method, divided by forward plus autograd's gradient-only backward
  (``loss.backward()``). HesScale, HesScaleGN and BL89 run as the optimizers run them: the
  forward pass of a copy registered with ``extend`` (its hooks record it), then
  ``loss_diagonals(loss, variant, factored=True)``, which also yields the gradient (at batch size
  1 the linear weights' diagonals stay rank-one factors); the others through
  ``hsbench.curvature.diagonal`` (one sample for the Monte-Carlo ones), as part ``backward,
  autograd``: timed in a group of their own with the gradient again, since interleaved with the
  exact Hessian's 8 ms tasks the 0.2 ms ones would be timed in the caches and freshly mapped
  pages those leave behind (the gradient's median then doubled, its interquartile range half of it).
* ``update``: one whole update (zero_grad, forward, backward, step) of every optimizer on
  networks of figure 8 (a) and (b) at batch size 1 (and depth 8 at batch size 128) and on
  DeepOBS's cifar100_3c3d network (ELU) at ``--batch-3c3d``, divided by ``torch.optim.Adam``'s
  (defaults, plain ``loss.backward()``);
  measured as in the ``update-time`` kind (``hsbench.experiments.update_time``).
* ``rl update``: one PPO minibatch update as ``hsbench.rl.ppo`` makes it (clipped surrogate of the
  actor and the MSE of the critic, then per network zero_grad, backward, step; one optimizer per
  network from ``hsbench.rl.training.make_optimizer``), minibatch 64, CleanRL's 2×64 tanh networks
  at Hopper-v5's sizes, for Adam, AdaHesScale, Scaled AdaHesScale and Scaled Adam, divided by Adam's;
  on the CPU (as the RL kinds), ten times ``--rounds`` and ``--warmup`` calls (an update takes
  about 2 ms; its spread is wide).

Within each network all methods are interleaved round-robin in random order (``hsbench.timing``);
the table gives the median and the interquartile range over ``--rounds`` calls after ``--warmup``.
First, glibc's allocator is told to keep tensors of up to 64 MB on its heap
(``hsbench.timing.steady_allocator``, named in the header): with its default thresholds, which
adjust themselves to earlier allocations, a task's large tensors were in some processes mapped
and page-faulted in anew every round, and the medians measured that.
The table is printed and written to ``--out`` (default ``plots/bench.md``, which the README links).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from hsbench.curvature import diagonal, extend, loss_diagonals
from hsbench.curvature.diagonal_backprop import VARIANTS
from hsbench.engine.provenance import git_revision, versions
from hsbench.experiments.update_time import INPUTS, OUTPUTS_B, panel_network, twin_models, update_tasks
from hsbench.losses import PPOLoss, log_prob
from hsbench.optim import OPTIMIZERS
from hsbench.problems import get as get_problem
from hsbench.rl import networks, ppo
from hsbench.rl.training import make_optimizer
from hsbench.timing import CLOCKS, Task, interleaved, steady_allocator, summary

AUTOGRAD_METHODS = ("exact", "ggn", "ggn-mc", "hutchinson", "kfac")  # through hsbench.curvature.diagonal
GRADIENT = "gradient (autograd)"


def backward_tasks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Task]:
    """Forward + backward of the gradient (autograd) and of each curvature method on ``model``
    (the diagonal backpropagation methods on an extended copy)."""
    loss_fn = nn.CrossEntropyLoss()
    extended, extended_loss_fn = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())

    def gradient() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    def ours(variant: str) -> Callable[[], object]:
        return lambda: loss_diagonals(extended_loss_fn(extended(x), y), variant, factored=True)

    def estimator(method: str) -> Callable[[], object]:
        return lambda: diagonal(method, model, loss_fn, x, y)

    nothing = lambda: None  # noqa: E731
    tasks: dict[str, Task] = {GRADIENT: (nothing, gradient)}
    tasks |= {variant: (nothing, ours(variant)) for variant in VARIANTS}
    tasks |= {method: (nothing, estimator(method)) for method in AUTOGRAD_METHODS}
    return tasks


UpdateNetwork = tuple[str, Callable[[], nn.Module], Callable[[torch.Generator], tuple]]
"""(label, network builder, batch maker) of the update benchmark."""


def update_networks(tiny: bool, batch_3c3d: int) -> list[UpdateNetwork]:
    """The networks of the update benchmark (``tiny``: the smallest of each panel only)."""

    def mlp_batch(classes: int, n: int = 1) -> Callable[[torch.Generator], tuple]:
        return lambda gen: (torch.randn(n, INPUTS, generator=gen), torch.randint(classes, (n,), generator=gen))

    problem = get_problem("cifar100_3c3d")

    def cifar_batch(gen: torch.Generator) -> tuple:
        x = torch.randn(batch_3c3d, 3, 32, 32, generator=gen)
        return x, torch.randint(problem.classes, (batch_3c3d,), generator=gen)

    outputs, depths = ((16,), (1,)) if tiny else ((16, 512), (8, 32))

    def panel(name: str, size: int) -> Callable[[], nn.Module]:
        return lambda: panel_network(name, size)

    found: list[UpdateNetwork] = [(f"fig. 8(a), {o} outputs, batch 1", panel("a", o), mlp_batch(o)) for o in outputs]
    found += [(f"fig. 8(b), depth {d}, batch 1", panel("b", d), mlp_batch(OUTPUTS_B)) for d in depths]
    if not tiny:  # issue 14: at a large batch the update is bound by its matrix products
        found.append(("fig. 8(b), depth 8, batch 128", panel("b", 8), mlp_batch(OUTPUTS_B, 128)))
    found.append((f"cifar100_3c3d (ELU), batch {batch_3c3d}", lambda: problem.model("elu"), cifar_batch))
    return found


RL_OPTIMIZERS = ("adam", "adahesscale", "scaled-adahesscale", "scaled-adam")
OBS_DIM, ACT_DIM, MINIBATCH = 11, 3, 64  # Hopper-v5's observation and action sizes; PPO's minibatch


def ppo_update_tasks(gen: torch.Generator) -> tuple[dict[str, Task], int]:
    """Per optimizer of ``RL_OPTIMIZERS``: (restore the initial weights, one PPO minibatch update of
    actor and critic), all from the same networks and minibatch; and the number of parameters."""
    obs, actions = torch.randn(MINIBATCH, OBS_DIM, generator=gen), torch.randn(MINIBATCH, ACT_DIM, generator=gen)
    advantages, returns = torch.randn(MINIBATCH, generator=gen), torch.randn(MINIBATCH, generator=gen)
    tasks: dict[str, Task] = {}
    for name in RL_OPTIMIZERS:
        torch.manual_seed(0)
        actor, critic = networks.actor(OBS_DIM, ACT_DIM), networks.critic(OBS_DIM)
        with torch.no_grad():  # the rollout's policy: the ratio starts at 1
            old_logprobs = log_prob(actor(obs), actions, "gaussian", "log")
        pg_loss_fn, mse_fn = PPOLoss("gaussian", clip=0.2, variance="log"), nn.MSELoss()
        opts = make_optimizer(name, actor, pg_loss_fn, 3e-4), make_optimizer(name, critic, mse_fn, 3e-4)
        both = nn.ModuleList([actor, critic])
        initial = [p.detach().clone() for p in both.parameters()]

        @torch.no_grad()
        def restore(both=both, initial=initial) -> None:
            for p, p0 in zip(both.parameters(), initial, strict=True):
                p.copy_(p0)

        def update(actor=actor, critic=critic, pg_loss_fn=pg_loss_fn, mse_fn=mse_fn, opts=opts, old=old_logprobs):
            batch = (obs, actions, old, advantages, returns)
            for opt, loss in zip(opts, ppo.losses(actor, critic, pg_loss_fn, mse_fn, *batch), strict=True):
                opt.zero_grad()
                opt.backward(loss)
                opt.step()

        tasks[name] = (restore, update)
    return tasks, sum(p.numel() for p in both.parameters())


def rows_of(part: str, network: str, params: int, times: dict[str, list[float]], baseline: str) -> list[dict]:
    stats = {name: summary(values) for name, values in times.items()}
    return [
        {
            "part": part,
            "network": network,
            "params": params,
            "method": name,
            "median ms": round(1e3 * s["median"], 3),
            "IQR ms": round(1e3 * (s["q75"] - s["q25"]), 3),
            "ratio": round(s["median"] / stats[baseline]["median"], 2),
        }
        for name, s in sorted(stats.items(), key=lambda item: item[0] != baseline)  # baseline first
    ]


def measure(args: argparse.Namespace) -> pd.DataFrame:
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    run = lambda tasks: interleaved(tasks, args.rounds, args.warmup, gen, device, args.clock)  # noqa: E731
    rows = []
    torch.manual_seed(0)
    model = panel_network("b", 2).to(device)
    x, y = torch.randn(1, INPUTS, generator=gen).to(device), torch.randint(OUTPUTS_B, (1,), generator=gen).to(device)
    params = sum(p.numel() for p in model.parameters())
    tasks = backward_tasks(model, x, y)
    for part, methods in (("backward", VARIANTS), ("backward, autograd", AUTOGRAD_METHODS)):
        group = {name: tasks[name] for name in (GRADIENT, *methods)}
        rows += rows_of(part, "MLP 64-512-512-100 tanh, batch 1", params, run(group), GRADIENT)
    for label, build, batch in update_networks(args.tiny, args.batch_3c3d):
        x, y = (t.to(device) for t in batch(gen))
        plain, extended = twin_models(build, 0, device)
        params = sum(p.numel() for p in plain.parameters())
        rows += rows_of("update", label, params, run(update_tasks(plain, extended, x, y, list(OPTIMIZERS))), "adam")
        del plain, extended  # free the optimizer states before the next network
    tasks, params = ppo_update_tasks(gen)
    label = f"PPO minibatch {MINIBATCH}: actor + critic, 2x64 tanh"
    times = interleaved(tasks, 10 * args.rounds, 10 * args.warmup, gen, torch.device("cpu"), args.clock)
    rows += rows_of("rl update", label, params, times, "adam")
    return pd.DataFrame(rows)


def header(args: argparse.Namespace, steady: bool) -> str:
    lib = ", ".join(f"{k} {v}" for k, v in versions().items())
    return "\n".join(
        [
            f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            f"device: {args.device}; torch threads: {torch.get_num_threads()}; clock: {args.clock}; "
            f"{args.rounds} timed rounds after {args.warmup} warm-up rounds",
            f"versions: {lib}; git {git_revision()}",
            "allocator: "
            + ("glibc's, mmap and trim thresholds raised" if steady else "the C library's default")
            + " (hsbench.timing.steady_allocator)",
            "ratio: median / median of the gradient-only backward (parts backward) or of Adam's update "
            "(parts update, rl update)",
        ]
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hsbench.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="timed calls of every method (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls of every method first (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a shared machine)")
    p.add_argument(
        "--clock", choices=tuple(CLOCKS), default="wall", help="wall (perf_counter) or cpu (process CPU time)"
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--batch-3c3d", type=int, default=32, help="batch size of the cifar100_3c3d update (default 32)")
    p.add_argument("--tiny", action="store_true", help="smallest networks only (a quick check that everything runs)")
    p.add_argument("--out", type=Path, default=Path("plots/bench.md"), help="markdown file of the table")
    args = p.parse_args(argv)
    for name in ("rounds", "threads", "batch_3c3d"):
        if getattr(args, name) < (2 if name == "rounds" else 1):
            p.error(f"--{name.replace('_', '-')} must be at least {2 if name == 'rounds' else 1}")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    steady = steady_allocator()
    table = measure(args)
    text = f"{header(args, steady)}\n\n{table.to_markdown(index=False)}\n"
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
