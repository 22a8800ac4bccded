"""hsbench.backpack: HesScale, HesScaleGN and BL89 as BackPACK extensions equal hsbench's own walk.

The reference is ``hsbench.curvature.diagonal`` (itself tested against torch.func and the brute-force
recursion in test_curvature.py); BackPACK's own DiagHessian / DiagGGNExact run in the same backward.
"""

from __future__ import annotations

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import DiagGGNExact, DiagHessian
from cases import problem
from torch import nn

from hsbench.backpack import BL89, HesScale, HesScaleGN
from hsbench.curvature import diagonal

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

FIELDS = {"hesscale": (HesScale, "hesscale"), "hesscale-gn": (HesScaleGN, "hesscale_gn"), "bl89": (BL89, "bl89")}


def _backward(model, loss_fn, x, targets, *extensions, seed=None, weight=1.0):
    model, loss_fn = extend(model), extend(loss_fn)
    if seed is not None:
        torch.manual_seed(seed)
    loss = loss_fn(model(x)) if targets is None else loss_fn(model(x), targets)
    with backpack(*extensions):
        (weight * loss).backward()
    return model


def _assert_fields(model, field, expected, factor=1.0):
    found = {name: getattr(p, field) for name, p in model.named_parameters()}
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        message = lambda m, name=name: f"{field} of {name}: {m}"  # noqa: E731
        torch.testing.assert_close(found[name], factor * value, rtol=1e-10, atol=1e-12, msg=message)


CASES = [
    ("mlp-tanh", "ce"),
    ("mlp-sigmoid", "mse"),
    ("mlp-softplus", "ce-soft"),
    ("conv2d", "ce"),  # Conv2d (groups), ELU, MaxPool2d, Tanh, Flatten
    ("conv2d-strided", "mse"),  # ZeroPad2d, strided dilated Conv2d, LeakyReLU, AvgPool2d, Dropout, Identity
    ("conv1d", "ce"),
    ("conv3d", "gauss-log"),
    ("gaussian-head", "pg-gauss-log"),
    ("gaussian-head", "ppo-gauss"),
    ("mlp-exp", "entropy-cat"),
    ("mlp-elu", "ppo-cat"),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("model_name, loss_name", CASES)
def test_extensions_equal_hsbench_walk(model_name, loss_name, reduction):
    model, loss_fn, x, targets = problem(model_name, loss_name, reduction)
    expected = {method: diagonal(method, model, loss_fn, x, targets) for method in FIELDS}
    model = _backward(model, loss_fn, x, targets, *(extension() for extension, _ in FIELDS.values()))
    for method, (_, field) in FIELDS.items():
        _assert_fields(model, field, expected[method])


def test_dropout_in_training_mode_uses_the_forward_pass_mask():
    model, loss_fn, x, targets = problem("conv2d-strided", "ce", "mean", train=True)
    torch.manual_seed(3)
    expected = diagonal("hesscale", model, loss_fn, x, targets)
    _assert_fields(_backward(model, loss_fn, x, targets, HesScale(), seed=3), "hesscale", expected)


@pytest.mark.parametrize("model_name", ["mlp-relu", "conv2d"])
def test_next_to_backpack_own_extensions(model_name):
    model, loss_fn, x, targets = problem(model_name, "ce", "sum")
    expected = {method: diagonal(method, model, loss_fn, x, targets) for method in ("hesscale", "exact", "ggn")}
    model = _backward(model, loss_fn, x, targets, HesScale(), DiagHessian(), DiagGGNExact())
    _assert_fields(model, "hesscale", expected["hesscale"])
    _assert_fields(model, "diag_h", expected["exact"])
    _assert_fields(model, "diag_ggn_exact", expected["ggn"])


def test_a_weighted_loss_scales_the_diagonal():
    model, loss_fn, x, targets = problem("mlp-tanh", "ce", "mean")
    expected = diagonal("hesscale", model, loss_fn, x, targets)
    _assert_fields(_backward(model, loss_fn, x, targets, HesScale(), weight=-2.5), "hesscale", expected, factor=-2.5)


def test_two_losses_on_one_output_add_up():
    model, ce, x, labels = problem("mlp-tanh", "ce", "sum")
    mse, values = nn.MSELoss(), torch.randn(x.shape[0], 4, dtype=x.dtype, generator=torch.Generator().manual_seed(4))
    expected = diagonal("hesscale", model, ce, x, labels)
    for name, value in diagonal("hesscale", model, mse, x, values).items():
        expected[name] = expected[name] + 0.5 * value
    model, ce, mse = extend(model), extend(ce), extend(mse)
    z = model(x)
    with backpack(HesScale()):
        (ce(z, labels) + 0.5 * mse(z, values)).backward()
    _assert_fields(model, "hesscale", expected)


def test_unsupported_module_is_named():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(
        NotImplementedError, match=r"HesScale does not support module BatchNorm1d \(supported: .*Linear"
    ):
        _backward(model, nn.CrossEntropyLoss(), torch.randn(5, 3), torch.zeros(5, dtype=torch.long), HesScale())


def test_unsupported_loss_is_named():
    with pytest.raises(NotImplementedError, match="HesScaleGN does not support module L1Loss"):
        _backward(nn.Linear(3, 2), nn.L1Loss(), torch.randn(5, 3), torch.randn(5, 2), HesScaleGN())


@pytest.mark.parametrize(
    "model, loss_fn, x, targets, message",
    [
        (
            nn.Conv1d(1, 2, 3, padding=1, padding_mode="reflect"),
            nn.MSELoss(),
            torch.randn(4, 1, 5),
            torch.randn(4, 2, 5),
            "padding_mode='reflect' is not supported",
        ),
        (
            nn.Linear(3, 2),
            nn.CrossEntropyLoss(label_smoothing=0.1),
            torch.randn(4, 3),
            torch.zeros(4, dtype=torch.long),
            "label smoothing is not supported",
        ),
    ],
)
def test_unsupported_configuration_is_named(model, loss_fn, x, targets, message):
    with pytest.raises(ValueError, match=message):
        _backward(model, loss_fn, x, targets, BL89())


def test_loss_from_a_module_not_extended_is_an_error():
    model = extend(nn.Sequential(nn.Linear(3, 2)))
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.zeros(4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="nothing reached module Linear from the loss"), backpack(HesScale()):
        loss.backward()
