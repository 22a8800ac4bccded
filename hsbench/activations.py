"""Activations: ``Exponential``, and the hidden activations the experiments' settings choose from by name."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Exponential(nn.Module):
    """y = exp(x) elementwise, e.g. the last activation of a variance network (σ² = exp(x) > 0)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(x)


ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
"""ReLU (DeepOBS), ELU (ICML paper), tanh (workshop paper) and sigmoid (approximation quality)."""
