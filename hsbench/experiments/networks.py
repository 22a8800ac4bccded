"""Networks of the approximation-quality and diagonal-dominance studies (nn.Sequential, Kaiming init)."""

from __future__ import annotations

from itertools import pairwise
from typing import Literal

from hsbench.experiments.lazy import activations, nn

INITS = ("kaiming", "kaiming-bias", "torch-default")
GAINS: dict[str, Literal["relu", "tanh", "sigmoid"]] = {
    "relu": "relu",
    "elu": "relu",
    "tanh": "tanh",
    "sigmoid": "sigmoid",
}
"""torch.nn.init's gain name for each activation in ``hsbench.activations.ACTIVATIONS`` (ELU uses ReLU's)."""


def mlp(inputs: int, width: int, depth: int, classes: int, activation: str, init: str = "kaiming") -> nn.Sequential:
    """Flatten, then ``depth`` hidden layers of ``width`` units with ``activation``, then a linear output.

    ``init``: "kaiming" (see ``kaiming``), "kaiming-bias" (the same, biases drawn like the weights:
    normal with the weights' standard deviation gain/√fan_in, as the paper states for figure 2) or
    "torch-default" (PyTorch's Linear initialization, uniform with bound 1/√fan_in)."""
    widths = [inputs] + [width] * depth
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in pairwise(widths):
        layers += [nn.Linear(a, b), activations.ACTIVATIONS[activation]()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], classes))
    return model if init == "torch-default" else kaiming(model, activation, biases=init == "kaiming-bias")


def small_cnn(classes: int, activation: str) -> nn.Sequential:
    """For 1x28x28 inputs: conv 1→4 5x5 stride 2, pool 2, conv 4→8 3x3, flatten, linear 128 → classes."""
    act = activations.ACTIVATIONS[activation]
    model = nn.Sequential(
        nn.Conv2d(1, 4, 5, stride=2),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3),
        act(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, classes),
    )
    return kaiming(model, activation)


def kaiming(model: nn.Sequential, activation: str, biases: bool = False) -> nn.Sequential:
    """Kaiming-normal weights (fan-in, gain of the activation; ELU uses ReLU's); biases zero, or with
    ``biases`` normal with the weights' standard deviation."""
    gain = GAINS[activation]
    for module in model:
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(module.weight, nonlinearity=gain)
            if module.bias is None:
                continue
            if biases:
                std = nn.init.calculate_gain(gain) / module.weight[0].numel() ** 0.5  # kaiming_normal_'s, fan-in
                nn.init.normal_(module.bias, std=std)
            else:
                nn.init.zeros_(module.bias)
    return model
