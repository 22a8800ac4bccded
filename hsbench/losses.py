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

``GaussianHead`` (last module of a policy) produces ``[μ, ν]`` from a mean network's output and a
state-independent log standard deviation; ``Entropy`` is the policy's entropy as a loss module
(no target: ``entropy(output)``).
"""

from __future__ import annotations

import math
from typing import Any

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
    return gaussian_log_prob(var, (actions - mean).square() / var)


def gaussian_log_prob(var: Tensor, scaled_square: Tensor) -> Tensor:
    """log N(a | μ, σ²) per sample, shape (N,), from σ² and (a − μ)² / σ², both (N, D)."""
    return -0.5 * (var.log() + scaled_square + math.log(2 * math.pi)).sum(-1)


class GaussianHead(nn.Module):
    """Gaussian policy head with a state-independent log standard deviation (CleanRL's ``actor_logstd``).

    Put it last in a policy's ``nn.Sequential``, after the mean network. Input: the mean μ, shape
    (N, dim). Output: ``[μ, ν]``, shape (N, 2·dim), with ν = 2·log_std broadcast over the batch,
    which the ``variance="log"`` losses read as N(μ, exp(ν)) = N(μ, σ²). ``log_std`` is a
    parameter of shape (dim,), initialised to ``init_log_std``."""

    def __init__(self, dim: int, init_log_std: float = 0.0):
        super().__init__()
        self.dim = dim
        self.log_std = nn.Parameter(torch.full((dim,), float(init_log_std)))

    def forward(self, mean: Tensor) -> Tensor:
        if mean.dim() != 2 or mean.shape[1] != self.dim:
            raise ValueError(f"GaussianHead({self.dim}) needs a mean of shape (N, {self.dim}); got {tuple(mean.shape)}")
        return torch.cat([mean, (2 * self.log_std).expand_as(mean)], dim=1)


class _Reduced(nn.Module):
    """Shared reduction handling: subclasses implement ``per_sample(output, target) -> (N,)``."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        _check_choice("reduction", reduction, ("mean", "sum"))
        self.reduction = reduction

    def per_sample(self, output: Tensor, target: Any) -> Tensor:
        """The loss of each sample, shape (N,)."""
        raise NotImplementedError

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


class Entropy(_Reduced):
    """Entropy of the policy given by ``output`` (N, D_out), per sample, averaged or summed.

    It has no target: call it as ``entropy(output)``. Categorical: −Σ q log q with q the softmax of
    the logits. Gaussian ``[μ, ν]``: ½ Σ_i (1 + log 2π + log σ_i²), which does not depend on μ
    and, for ``variance="log"``, is linear in ν. An entropy bonus is subtracted from the loss
    being minimised (``pg_loss - 0.01 * entropy``)."""

    def __init__(self, distribution: str = "categorical", variance: str = "log", reduction: str = "mean"):
        super().__init__(reduction)
        _check_choice("distribution", distribution, DISTRIBUTIONS)
        _check_choice("variance", variance, VARIANCES)
        self.distribution, self.variance = distribution, variance

    def forward(self, output: Tensor, target=None) -> Tensor:
        if target is not None:
            raise ValueError("Entropy takes no target: call it as entropy(output)")
        return super().forward(output, target)

    def per_sample(self, output: Tensor, target=None) -> Tensor:
        if self.distribution == "categorical":
            log_q = torch.log_softmax(output, dim=-1)
            return -(log_q.exp() * log_q).sum(-1)
        _, var = gaussian_split(output, self.variance)
        return 0.5 * (1 + math.log(2 * math.pi) + var.log()).sum(-1)
