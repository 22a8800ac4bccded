"""Small networks and losses that the curvature tests run every method on (float64)."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from hsbench import losses
from hsbench.activations import Exponential

OUT = 4  # every test network ends in 4 outputs: 4 classes / actions, or [μ, ν] of a 2-d Gaussian
BATCH = 3

ACTIVATION_CASES = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "elu": lambda: nn.ELU(0.7),
    "selu": nn.SELU,
    "softplus": lambda: nn.Softplus(beta=1.5, threshold=3.0),
    "identity": nn.Identity,
    "exp": Exponential,
}


def mlp(activation="tanh", widths=(5, 4, 3)):
    layers = []
    for a, b in pairwise(widths):
        layers += [nn.Linear(a, b), ACTIVATION_CASES[activation]()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], OUT))


def gaussian_policy():
    """A mean network ending in 2 outputs and a GaussianHead: [μ, ν] with ν = 2·log_std (CleanRL's layout)."""
    head = losses.GaussianHead(OUT // 2)
    with torch.no_grad():
        head.log_std.copy_(torch.tensor([0.3, -0.4]))
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3), nn.ELU(), nn.Linear(3, OUT // 2), head)


def _inputs(shape, seed):
    return torch.randn((BATCH, *shape), generator=torch.Generator().manual_seed(seed))


MODELS = {
    # name: (builder, input shape per sample)
    **{f"mlp-{a}": (lambda a=a: mlp(a), (5,)) for a in ACTIVATION_CASES},
    "gaussian-head": (gaussian_policy, (5,)),
    "mlp-nobias-nested": (
        lambda: nn.Sequential(nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh()), nn.Linear(4, OUT, bias=False)),
        (5,),
    ),
    "conv2d": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.ELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 2, groups=2, stride=1, dilation=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(16, OUT),
        ),
        (2, 6, 6),
    ),
    "conv2d-strided": (
        lambda: nn.Sequential(
            nn.ZeroPad2d((1, 0, 2, 1)),
            nn.Conv2d(2, 3, 3, stride=2, dilation=2),
            nn.LeakyReLU(0.2),
            nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
            nn.Dropout(0.3),
            nn.Flatten(),
            nn.Identity(),
            nn.Linear(18, OUT),
        ),
        (2, 9, 8),
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2),
            nn.Sigmoid(),
            nn.AvgPool1d(2),
            nn.MaxPool1d(2, stride=1, padding=1, dilation=1),
            nn.Flatten(),
            nn.Linear(12, OUT),
        ),
        (2, 9),
    ),
    "conv3d": (
        lambda: nn.Sequential(
            nn.Conv3d(1, 2, 2, padding=1, dilation=(1, 2, 1)),
            nn.Softplus(),
            nn.AvgPool3d(2, padding=1),
            nn.MaxPool3d(2, stride=1),
            nn.SELU(),
            nn.Flatten(),
            nn.Linear(16, OUT),
        ),
        (1, 3, 4, 3),
    ),
}


def _gaussian_target(z, generator):
    return torch.randn((z.shape[0], OUT // 2), generator=generator, dtype=z.dtype)


def _ppo_target(loss, z, generator):
    actions = (
        torch.randint(0, OUT, (z.shape[0],), generator=generator)
        if loss.distribution == "categorical"
        else _gaussian_target(z, generator)
    )
    advantages = torch.randn(z.shape[0], generator=generator, dtype=z.dtype)
    current = losses.log_prob(z, actions, loss.distribution, loss.variance).detach()
    shift = torch.tensor([0.5, -0.05, -0.5] * z.shape[0], dtype=z.dtype)[: z.shape[0]]  # clipped and unclipped
    return actions, advantages, current + shift


LOSSES = {
    # name: (loss builder(reduction), target builder(loss, z, generator), needs positive outputs)
    "ce": (
        lambda r: nn.CrossEntropyLoss(reduction=r),
        lambda loss, z, g: torch.randint(0, OUT, (z.shape[0],), generator=g),
        False,
    ),
    "ce-soft": (
        lambda r: nn.CrossEntropyLoss(reduction=r),
        lambda loss, z, g: torch.softmax(torch.randn(z.shape, generator=g, dtype=z.dtype), 1),
        False,
    ),
    "mse": (
        lambda r: nn.MSELoss(reduction=r),
        lambda loss, z, g: torch.randn(z.shape, generator=g, dtype=z.dtype),
        False,
    ),
    "gauss-log": (lambda r: losses.GaussianNLLLoss("log", r), lambda loss, z, g: _gaussian_target(z, g), False),
    "gauss-raw": (lambda r: losses.GaussianNLLLoss("raw", r), lambda loss, z, g: _gaussian_target(z, g), True),
    "pg-cat": (
        lambda r: losses.PolicyGradientLoss("categorical", reduction=r),
        lambda loss, z, g: (
            torch.randint(0, OUT, (z.shape[0],), generator=g),
            torch.randn(z.shape[0], generator=g, dtype=z.dtype),
        ),
        False,
    ),
    "pg-gauss": (
        lambda r: losses.PolicyGradientLoss("gaussian", "raw", reduction=r),
        lambda loss, z, g: (_gaussian_target(z, g), torch.randn(z.shape[0], generator=g, dtype=z.dtype)),
        True,
    ),
    "pg-gauss-log": (
        lambda r: losses.PolicyGradientLoss("gaussian", "log", reduction=r),
        lambda loss, z, g: (_gaussian_target(z, g), torch.randn(z.shape[0], generator=g, dtype=z.dtype)),
        False,
    ),
    "ppo-cat": (lambda r: losses.PPOLoss("categorical", reduction=r), _ppo_target, False),
    "ppo-gauss": (lambda r: losses.PPOLoss("gaussian", variance="log", reduction=r), _ppo_target, False),
    "entropy-cat": (lambda r: losses.Entropy("categorical", reduction=r), lambda loss, z, g: None, False),
    "entropy-gauss": (lambda r: losses.Entropy("gaussian", "log", reduction=r), lambda loss, z, g: None, False),
    "entropy-gauss-raw": (lambda r: losses.Entropy("gaussian", "raw", reduction=r), lambda loss, z, g: None, True),
}


def problem(model_name="mlp-tanh", loss_name="ce", reduction="mean", seed=0, train=False):
    """(model, loss_fn, inputs, targets) with fixed seeds; raw-variance losses get a Softplus output.

    The model is in evaluation mode (dropout off) unless ``train``."""
    torch.manual_seed(seed)
    build, shape = MODELS[model_name]
    model = build().double().train(train)
    make_loss, make_target, positive = LOSSES[loss_name]
    if positive:
        model = nn.Sequential(model, nn.Softplus())
    loss_fn = make_loss(reduction)
    x = _inputs(shape, seed + 1).double()
    with torch.no_grad():
        z = model(x)
    targets = make_target(loss_fn, z, torch.Generator().manual_seed(seed + 2))
    return model, loss_fn, x, targets
