"""Losses beyond torch's own that the curvature core supports with exact last-layer diagonals.

All losses here follow torch's convention ``loss_fn(output, target)`` with ``reduction`` in
{'mean', 'sum'} taken over the batch: the per-sample loss ℓ_n is computed first (for a Gaussian,
summed over its dimensions, i.e. a proper negative log-likelihood), then averaged or summed.

Policies are parametrized by the network's output ``z`` of shape (N, D_out):

* ``categorical``: ``z`` are the logits of a softmax distribution over D_out actions;
  actions are integer indices of shape (N,).
* ``gaussian``: ``z = [μ, ν]`` split in two halves along the last dimension (D_out = 2 D); the
  variance is σ² = ν (``variance="raw"``, the parametrization of the paper's appendix B) or
  σ² = exp(ν) (``variance="log"``, which keeps σ² positive for any network output); actions have
  shape (N, D).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

DISTRIBUTIONS = ("categorical", "gaussian")
VARIANCES = ("log", "raw")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def gaussian_split(z: Tensor, variance: str) -> tuple[Tensor, Tensor]:
    """Mean μ and variance σ² from an output ``z = [μ, ν]`` of shape (N, 2D)."""
    if z.shape[-1] % 2:
        raise ValueError(f"a Gaussian output needs an even last dimension [mean, variance]; got {z.shape[-1]}")
    mean, nu = z.chunk(2, dim=-1)
    return mean, (nu.exp() if variance == "log" else nu)


def log_prob(z: Tensor, actions: Tensor, distribution: str, variance: str = "log") -> Tensor:
    """log π(a | z) per sample, shape (N,)."""
    if distribution == "categorical":
        return torch.log_softmax(z, dim=-1).gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    mean, var = gaussian_split(z, variance)
    return -0.5 * (var.log() + (actions - mean) ** 2 / var + math.log(2 * math.pi)).sum(-1)


class _Reduced(nn.Module):
    """Shared reduction handling: subclasses implement ``per_sample(output, target) -> (N,)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        _check_choice("reduction", reduction, ("mean", "sum"))
        self.reduction = reduction

    def forward(self, output: Tensor, target) -> Tensor:
        per_sample = self.per_sample(output, target)
        return per_sample.mean() if self.reduction == "mean" else per_sample.sum()


class GaussianNLLLoss(_Reduced):
    """Negative log-likelihood of ``target`` (N, D) under N(μ, diag σ²) with ``output = [μ, ν]`` (N, 2D).

    Unlike ``torch.nn.GaussianNLLLoss`` the network outputs mean and variance together, so the
    loss is a function of the network output alone, as the curvature core requires.
    """

    def __init__(self, variance: str = "log", reduction: str = "mean"):
        super().__init__(reduction)
        _check_choice("variance", variance, VARIANCES)
        self.variance = variance

    def per_sample(self, output: Tensor, target: Tensor) -> Tensor:
        return -log_prob(output, target, "gaussian", self.variance)


class PolicyGradientLoss(_Reduced):
    """Policy-gradient loss ℓ = −A · log π(a | s) (appendix C.1); ``target = (actions, advantages)``."""

    def __init__(self, distribution: str = "categorical", variance: str = "log", reduction: str = "mean"):
        super().__init__(reduction)
        _check_choice("distribution", distribution, DISTRIBUTIONS)
        _check_choice("variance", variance, VARIANCES)
        self.distribution, self.variance = distribution, variance

    def per_sample(self, output: Tensor, target: tuple[Tensor, Tensor]) -> Tensor:
        actions, advantages = target
        return -advantages * log_prob(output, actions, self.distribution, self.variance)


class PPOLoss(_Reduced):
    """PPO clipped surrogate ℓ = −min(r A, clip(r, 1−ε, 1+ε) A), r = π(a|s) / π_old(a|s) (appendix C.3).

    ``target = (actions, advantages, old_log_probs)``.
    """

    def __init__(
        self, distribution: str = "categorical", clip: float = 0.2, variance: str = "log", reduction: str = "mean"
    ):
        super().__init__(reduction)
        _check_choice("distribution", distribution, DISTRIBUTIONS)
        _check_choice("variance", variance, VARIANCES)
        if not clip > 0:
            raise ValueError(f"clip must be positive; got {clip}")
        self.distribution, self.variance, self.clip = distribution, variance, clip

    def ratio(self, output: Tensor, target: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        actions, _, old_log_probs = target
        return (log_prob(output, actions, self.distribution, self.variance) - old_log_probs).exp()

    def per_sample(self, output: Tensor, target: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        advantages = target[1]
        r = self.ratio(output, target)
        return -torch.minimum(r * advantages, r.clamp(1 - self.clip, 1 + self.clip) * advantages)
