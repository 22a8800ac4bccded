"""Small data sets written in the real on-disk formats that torchvision reads (no download)."""

import pickle

import numpy as np

N_TRAIN, N_TEST = 40, 10


def images(n: int, shape: tuple[int, ...], offset: int) -> np.ndarray:
    """uint8 images whose first two pixels encode their index (offset + i) for identification."""
    rng = np.random.default_rng(offset)
    x = rng.integers(0, 256, size=(n, int(np.prod(shape))), dtype=np.uint8)
    index = np.arange(offset, offset + n)
    x[:, 0], x[:, 1] = index % 256, index // 256
    return x


def write_cifar(root, classes: int) -> dict[str, np.ndarray]:
    """CIFAR-10 or -100 python pickles as torchvision reads them; returns the flat test images."""

    def dump(path, obj):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(obj))

    labels = lambda n, seed: np.random.default_rng(seed).integers(0, classes, n).tolist()  # noqa: E731
    train, test = images(N_TRAIN, (3, 32, 32), 0), images(N_TEST, (3, 32, 32), N_TRAIN)
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        for i, chunk in enumerate(np.split(train, 5), start=1):
            dump(folder / f"data_batch_{i}", {"data": chunk, "labels": labels(len(chunk), i)})
        dump(folder / "test_batch", {"data": test, "labels": labels(N_TEST, 9)})
        dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        for split, x, seed in (("train", train, 1), ("test", test, 9)):
            dump(
                folder / split, {"data": x, "fine_labels": labels(len(x), seed), "coarse_labels": labels(len(x), seed)}
            )
        dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return test


def write_mnist(root) -> np.ndarray:
    """MNIST idx files under MNIST/raw/ as torchvision reads them; returns the flat test images."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, x in (("train", images(N_TRAIN, (28, 28), 0)), ("t10k", images(N_TEST, (28, 28), N_TRAIN))):
        header = np.array([2051, len(x), 28, 28], dtype=">i4").tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + x.tobytes())
        labels = np.random.default_rng(len(x)).integers(0, 10, len(x)).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            np.array([2049, len(x)], dtype=">i4").tobytes() + labels.tobytes()
        )
        test = x
    return test
