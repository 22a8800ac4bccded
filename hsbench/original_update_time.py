"""Figure 8 for the original HesScale implementation: the update time of the authors' AdaHesScale
and AdaHesScaleGN (``optimizers`` of their ``hesscale`` package, BackPACK extensions) divided by
``torch.optim.Adam``'s, measured as ``hsbench.experiments.update_time`` measures ours, so that
the README can set the original's ratios beside ours and the paper's (issue 14).

The package only runs on the stack it was written for: Python 3.7 or 3.8, torch 1.10 and
backpack-for-pytorch 1.3 (with BackPACK 1.7 its imports fail, and torch 2's backward hooks hide
what its extensions set on module outputs). ``make figure8-original`` makes that environment
(``.venv-original``) and runs this module there, from the repository root::

    .venv-original/bin/python -m hsbench.original_update_time --out plots/original/figure8.md

So this module runs on Python 3.8 and torch 1.10 (no newer syntax or library calls) and imports
nothing of hsbench but ``hsbench.timing``; the package is imported only where it is timed, so
``--optimizers adam`` runs (and is tested) on hsbench's own stack.

The protocol is ``update_time``'s: the networks of figure 8 (64 inputs; panel a: one hidden layer
of 512 tanh units, 16 … ``--max-outputs`` outputs; panel b: 1 … ``--max-depth`` such layers, 100
outputs; PyTorch's default initialization, seed 0; cross-entropy on one fixed random batch); per
network every optimizer updates ``--warmup`` + ``--updates`` times, interleaved round-robin in
random order (``hsbench.timing.interleaved``) from the same initial weights, restored untimed
before every update; one update is zero_grad, forward, backward, step. Adam (defaults) updates a
plain copy with ``loss.backward()``; the original optimizers (their defaults) a copy registered
with BackPACK's ``extend``, the backward inside ``with backpack(opt.method)``, as the package's
README shows. The table gives Adam's median in ms and every other optimizer's median / Adam's.
Two differences from figure 8's runs: each network's input batch is drawn from the generator
that also orders the tasks, as there, but with 3 tasks instead of 9 it is figure 8's batch for the
first network only; and hsbench's Adam checks the loss and the gradients finite, this one does
not. ``--flush-denormal`` treats subnormal floats as zero throughout, as hsbench's optimizers
do inside their backward and step (the original's run in the default mode, where subnormal
arithmetic slows deep networks down).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import platform
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hsbench.timing import Task, interleaved, summary

INPUTS, WIDTH, OUTPUTS_B, FIRST_OUTPUTS = 64, 512, 100, 16  # hsbench.experiments.update_time's
ORIGINAL = {
    "adahesscale": ("optimizers.adahesscale", "AdaHesScale"),
    "adahesscale-gn": ("optimizers.adahesscalegn", "AdaHesScaleGN"),
}


def network(panel: str, size: int) -> nn.Sequential:
    """Figure 8's network: ``size`` outputs (panel a) or hidden layers (panel b), seeded 0."""
    depth, outputs = (1, size) if panel == "a" else (size, OUTPUTS_B)
    widths = [INPUTS] + [WIDTH] * depth
    torch.manual_seed(0)
    layers: list = [nn.Flatten()]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], outputs))


def update_tasks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list) -> dict:
    """Per optimizer name: (restore the initial weights, one update), on its own copy of ``model``."""
    tasks = {}
    for name in names:
        net, loss_fn = copy.deepcopy(model), nn.CrossEntropyLoss()
        if name == "adam":
            opt = torch.optim.Adam(net.parameters())
            backward = lambda loss: loss.backward()  # noqa: E731
        else:
            from backpack import backpack, extend  # the original's stack only

            module, cls = ORIGINAL[name]
            net, loss_fn = extend(net), extend(loss_fn)
            opt = getattr(importlib.import_module(module), cls)(net.parameters())

            def backward(loss, opt=opt, backpack=backpack):
                with backpack(opt.method):
                    loss.backward()

        tasks[name] = (_restorer(net, model), _updater(net, loss_fn, opt, backward, x, y))
    return tasks


def _restorer(net: nn.Module, model: nn.Module) -> Callable[[], None]:
    initial = [p.detach().clone() for p in model.parameters()]

    def restore() -> None:
        with torch.no_grad():
            for p, p0 in zip(net.parameters(), initial):
                p.copy_(p0)

    return restore


def _updater(net, loss_fn, opt, backward, x, y) -> Callable[[], None]:
    def update() -> None:
        opt.zero_grad()
        backward(loss_fn(net(x), y))
        opt.step()

    return update


def measure(args: argparse.Namespace) -> list:
    """One row per network: panel, size, parameters, Adam's median (ms), ratios to it."""
    generator = torch.Generator().manual_seed(0)
    sizes = {"a": _powers(FIRST_OUTPUTS, args.max_outputs), "b": _powers(1, args.max_depth)}
    rows = []
    for panel in args.panels:
        for size in sizes[panel]:
            model = network(panel, size)
            classes = size if panel == "a" else OUTPUTS_B
            x = torch.randn(1, INPUTS, generator=generator)
            y = torch.randint(classes, (1,), generator=generator)
            tasks: dict[str, Task] = update_tasks(model, x, y, args.optimizers)
            times = interleaved(tasks, args.updates, args.warmup, generator, torch.device("cpu"))
            medians = {name: summary(t)["median"] for name, t in times.items()}
            row = {"panel": panel, "size": size, "params": sum(p.numel() for p in model.parameters())}
            row["adam ms"] = round(1e3 * medians["adam"], 3)
            row.update({name: round(medians[name] / medians["adam"], 2) for name in args.optimizers if name != "adam"})
            rows.append(row)
            print(row, flush=True)
    return rows


def _powers(low: int, high: int) -> list:
    return [2**k for k in range(low.bit_length() - 1, high.bit_length())]


def table(rows: list, names: list) -> str:
    """The rows as one markdown table per panel."""
    others = [name for name in names if name != "adam"]
    parts = []
    for panel, label in (("a", "outputs"), ("b", "depth")):
        mine = [row for row in rows if row["panel"] == panel]
        if mine:
            lines = ["| " + " | ".join([label, "params", "adam ms", *others]) + " |", "|" + "---:|" * (3 + len(others))]
            for row in mine:
                cells = [row["size"], f"{row['params']:,}", row["adam ms"], *(row[name] for name in others)]
                lines.append("| " + " | ".join(str(c) for c in cells) + " |")
            parts.append(f"Figure 8({panel}), batch 1:\n\n" + "\n".join(lines))
    return "\n\n".join(parts)


def header(args: argparse.Namespace) -> str:
    from importlib import metadata

    def version(package: str) -> str:
        """The package's version, and where pip installed it from (a git commit, a folder)."""
        try:
            found = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            return f"no {package}"
        source = json.loads(found.read_text("direct_url.json") or "{}")
        origin = source.get("vcs_info", {}).get("commit_id") or source.get("url")
        return f"{package} {found.version}" + (f" from {origin}" if origin else "")

    flush = "subnormals flushed to zero" if args.flush_denormal else "subnormals not flushed"
    return (
        f"Original HesScale implementation, update time / Adam's (medians of {args.updates} updates after "
        f"{args.warmup} warm-up ones, interleaved; 1 torch thread, wall clock, {flush})\n\n"
        f"machine: {platform.platform()}; python {platform.python_version()}, torch {torch.__version__}, "
        f"{version('backpack-for-pytorch')}, {version('HesScale')}"
    )


def main(argv: list | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hsbench.original_update_time", description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizers", type=lambda s: s.split(","), default=["adam", *ORIGINAL])
    p.add_argument("--panels", type=lambda s: s.split(","), default=["a", "b"])
    p.add_argument("--max-outputs", type=int, default=512)
    p.add_argument("--max-depth", type=int, default=128)
    p.add_argument("--updates", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("plots/original/figure8.md"))
    p.add_argument(
        "--flush-denormal",
        action="store_true",
        help="treat subnormal floats as zero throughout (torch.set_flush_denormal), as hsbench's optimizers do "
        "inside their backward and step; Adam and the original's do not by default",
    )
    args = p.parse_args(argv)
    unknown = [name for name in args.optimizers if name != "adam" and name not in ORIGINAL]
    if "adam" not in args.optimizers or unknown or not set(args.panels) <= {"a", "b"}:
        choices = f"--optimizers: adam and any of {', '.join(ORIGINAL)}; --panels: a, b"
        p.error(f"{choices} (got {','.join(args.optimizers)} and {','.join(args.panels)})")
    for name, low in (("max_outputs", FIRST_OUTPUTS), ("max_depth", 1)):  # figure 8's sizes: powers of two
        value = getattr(args, name)
        if value < low or value & (value - 1):
            p.error(f"--{name.replace('_', '-')} must be a power of two of at least {low}; got {value}")
    if args.updates < 2 or args.warmup < 0:
        p.error(f"--updates must be at least 2 and --warmup at least 0; got {args.updates} and {args.warmup}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(args.flush_denormal)  # a command-line run: the default mode is off
    try:
        text = f"{header(args)}\n\n{table(measure(args), args.optimizers)}\n"
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")  # renamed into place: never half a table
    partial.write_text(text)
    partial.replace(args.out)
    print(text + f"(written to {args.out})")


if __name__ == "__main__":
    main()
