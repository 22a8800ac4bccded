"""DeepOBS's data pipelines on in-memory tensors: splits, augmentation, normalisation, batches.

DeepOBS holds out ``EVAL_SIZE`` random training images as the validation set (a fresh split
per random seed), trains on the rest, reports the training metrics on a "train-eval" subset
of the same size and evaluates on the full test set. Training batches are reshuffled every
epoch and the last incomplete batch is dropped.

CIFAR augmentation (DeepOBS's ``training_transform_augmented``): zero-pad by 2, random 32x32
crop, random horizontal flip, then ColorJitter (brightness ±63/255, contrast [0.2, 1.8],
saturation [0.5, 1.5], applied in a random order per image), then per-channel normalisation.
Here these run on whole batches of float tensors (on the training device) with parameters
drawn from one ``torch.Generator``, so a run is reproducible and resumable; DeepOBS applies
them per image on uint8 PIL images, which rounds after each operation. Evaluation sets are
normalised, never augmented. Differences from DeepOBS's PyTorch code, on purpose: train-eval
is a fixed subset of the training images seen without augmentation (DeepOBS redraws it every
epoch from all 50,000 training images, validation images included, with augmentation), and
evaluation uses every image (DeepOBS drops the last incomplete batch).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

EVAL_SIZE = 10_000
"""DeepOBS's ``train_eval_size``: images in the validation and in the train-eval set."""

NORMALIZATION = {
    "cifar10": ((0.49139968, 0.48215841, 0.44653091), (0.24703223, 0.24348513, 0.26158784)),
    "cifar100": ((0.50707516, 0.48654887, 0.44091784), (0.26733429, 0.25643846, 0.27615047)),
}
"""Per-channel (mean, std) of DeepOBS's ``transforms.Normalize``; MNIST is not normalised."""

PAD = 2
BRIGHTNESS = 63.0 / 255.0
CONTRAST = (0.2, 1.8)
SATURATION = (0.5, 1.5)
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass
class Data:
    """The four splits of one data set, each (images (N, C, H, W) float in [0, 1], labels (N,) int64).

    ``description`` names the data actually used (for records and figure captions)."""

    train: tuple[Tensor, Tensor]
    train_eval: tuple[Tensor, Tensor]
    valid: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None
    augment: bool
    description: str

    def to(self, device: str | torch.device) -> Data:
        def move(split: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            x, y = split
            return x.to(device), y.to(device)

        return replace(
            self, train=move(self.train), train_eval=move(self.train_eval), valid=move(self.valid), test=move(self.test)
        )

    def normalize(self, x: Tensor) -> Tensor:
        if self.normalization is None:
            return x
        mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in self.normalization)
        return (x - mean) / std

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled, augmented (if ``augment``) and normalised training batches;
        the last incomplete batch is dropped. Randomness comes from ``generator`` (CPU) only."""
        x, y = self.train
        order = torch.randperm(len(y), generator=generator).to(y.device)  # drawn on the CPU generator
        for start in range(0, len(y) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            batch = x[index]
            if self.augment:
                batch = augment(batch, generator)
            yield self.normalize(batch), y[index]

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Normalised batches of ``split`` ('train_eval', 'valid' or 'test'), in order, all images."""
        x, y = getattr(self, split)
        for start in range(0, len(y), batch_size):
            yield self.normalize(x[start : start + batch_size]), y[start : start + batch_size]


def split(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    seed: int,
    eval_size: int,
    normalization=None,
    augment: bool = False,
    description: str = "",
) -> Data:
    """DeepOBS's splits: ``eval_size`` random training images (drawn from ``seed``) become the
    validation set, the others the training set, whose first ``eval_size`` (in the same random
    order) form the train-eval set."""
    x, y = train
    if not 0 < eval_size < len(y) // 2:
        raise ValueError(f"eval_size must be in (0, {len(y) // 2}) for {len(y)} training images; got {eval_size}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    valid, rest = order[:eval_size], order[eval_size:]
    return Data(
        train=(x[rest], y[rest]),
        train_eval=(x[rest[:eval_size]], y[rest[:eval_size]]),
        valid=(x[valid], y[valid]),
        test=test,
        normalization=normalization,
        augment=augment,
        description=description,
    )


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """DeepOBS's CIFAR augmentation of a batch (B, 3, H, W) in [0, 1]; parameters from ``generator``."""
    b, _, h, w = x.shape
    draw = lambda *shape: torch.rand(*shape, generator=generator).to(x.device)  # noqa: E731
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    top = (draw(b) * (2 * PAD + 1)).long().clamp_max(2 * PAD)
    left = (draw(b) * (2 * PAD + 1)).long().clamp_max(2 * PAD)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
    x = padded.permute(0, 2, 3, 1)[torch.arange(b, device=x.device)[:, None, None], rows, cols].permute(0, 3, 1, 2)
    flip = draw(b) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return color_jitter(x, generator)


def color_jitter(x: Tensor, generator: torch.Generator) -> Tensor:
    """torchvision's ColorJitter(brightness=63/255, contrast=(0.2, 1.8), saturation=(0.5, 1.5))
    on tensors, per image: factors uniform in their ranges, the three operations in a random order."""
    b = x.shape[0]
    draw = lambda low, high: (low + (high - low) * torch.rand(b, generator=generator)).to(x.device).view(b, 1, 1, 1)  # noqa: E731
    factors = (draw(1 - BRIGHTNESS, 1 + BRIGHTNESS), draw(*CONTRAST), draw(*SATURATION))
    order = torch.argsort(torch.rand(b, 3, generator=generator), dim=1).to(x.device)  # a random permutation per image
    weights = torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)

    def apply(op: int, img: Tensor) -> Tensor:
        if op == 0:  # brightness: blend with black
            return (img * factors[0]).clamp(0, 1)
        gray = (img * weights).sum(1, keepdim=True)
        if op == 1:  # contrast: blend with the mean gray level of the image
            return (factors[1] * img + (1 - factors[1]) * gray.mean((2, 3), keepdim=True)).clamp(0, 1)
        return (factors[2] * img + (1 - factors[2]) * gray).clamp(0, 1)  # saturation: blend with gray

    for position in range(3):
        chosen = (torch.where((order[:, position] == op).view(b, 1, 1, 1), apply(op, x), 0) for op in range(3))
        x = sum(chosen, torch.zeros_like(x))  # one op per image: the others contribute zeros
    return x
