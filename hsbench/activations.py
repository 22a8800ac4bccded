"""Activations by name: the hidden activations the experiments' settings choose from."""

from __future__ import annotations

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
"""ReLU (DeepOBS), ELU (ICML paper), tanh (workshop paper) and sigmoid (approximation quality)."""
