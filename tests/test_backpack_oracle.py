"""BackPACK as an independent oracle for hsbench's curvature methods (float64, small networks).

* ``exact``, ``ggn`` and their per-sample versions equal BackPACK's DiagHessian, DiagGGNExact,
  BatchDiagHessian and BatchDiagGGNExact. Per-sample conventions: hsbench's ``per_sample`` is the
  diagonal of each sample's own loss ℓ_n, BackPACK's Batch* that of the sample's term in the batch
  loss, so they differ by the reduction's factor (1/N for 'mean', 1 for 'sum').
* ``ggn-mc`` converges to DiagGGNExact, ``kfac`` to the diagonal of BackPACK's KFLR (exact
  Kronecker factors) where the two conventions agree (Linear layers).
* Convolutions' KFAC differs (docs/backpack.md): hsbench follows KFC, averaging the output factor
  over positions; BackPACK sums the backpropagated vectors over positions first.
"""

from __future__ import annotations

import pytest
import torch
from backpack import backpack, extend
from backpack.extensions import KFLR, BatchDiagGGNExact, BatchDiagHessian, DiagGGNExact, DiagHessian
from cases import BATCH, problem
from torch import nn

from hsbench.curvature import diagonal

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _pooled_cnn():
    """Padding, a strided convolution, average pooling and dropout (evaluation mode), all in BackPACK.

    In float32: BackPACK 1.7.1's average pooling fails on float64 ("expected scalar type Double")."""
    return nn.Sequential(
        nn.ZeroPad2d(1),
        nn.Conv2d(2, 3, 3, stride=2),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Dropout(0.2),
        nn.Flatten(),
        nn.Linear(12, 4),
    )


def _problem(model_name, loss_name, reduction):
    """(model, loss_fn, x, targets) from tests/cases.py; "pooled-cnn" swaps in ``_pooled_cnn``."""
    if model_name != "pooled-cnn":
        return problem(model_name, loss_name, reduction)
    _, loss_fn, _, targets = problem("mlp-tanh", loss_name, reduction)
    torch.manual_seed(0)
    model = _pooled_cnn().eval()
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        targets = targets.float()
    return model, loss_fn, torch.randn(BATCH, 2, 8, 8), targets


def _backpack_fields(model, loss_fn, x, targets, *extensions):
    model, loss_fn = extend(model), extend(loss_fn)
    with backpack(*extensions):
        loss_fn(model(x), targets).backward()
    return model


def _field(model, name):
    return {key: getattr(p, name) for key, p in model.named_parameters()}


def _assert_close(found, expected):
    assert found.keys() == expected.keys()
    rtol, atol = (1e-9, 1e-12) if next(iter(expected.values())).dtype == torch.float64 else (1e-4, 1e-7)
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=rtol, atol=atol, msg=lambda m: f"{key}: {m}")


def _relative_error(found, expected):
    return {key: float((found[key] - expected[key]).norm() / expected[key].norm()) for key in expected}


# ---------------------------------------------------------------------------------------------
# exact and GGN diagonals, batch and per sample


MODELS = ["mlp-elu", "conv2d", "pooled-cnn"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
@pytest.mark.parametrize("model_name", MODELS)
def test_exact_and_ggn_equal_diag_hessian_and_diag_ggn_exact(model_name, loss_name, reduction):
    model, loss_fn, x, targets = _problem(model_name, loss_name, reduction)
    exact, ggn = (diagonal(method, model, loss_fn, x, targets) for method in ("exact", "ggn"))
    model = _backpack_fields(model, loss_fn, x, targets, DiagHessian(), DiagGGNExact())
    _assert_close(exact, _field(model, "diag_h"))
    _assert_close(ggn, _field(model, "diag_ggn_exact"))


@pytest.mark.parametrize("loss_name, reduction", [("ce", "mean"), ("mse", "sum")])
@pytest.mark.parametrize("model_name", MODELS)
def test_per_sample_exact_and_ggn_equal_batch_diag_hessian_and_ggn(model_name, loss_name, reduction):
    model, loss_fn, x, targets = _problem(model_name, loss_name, reduction)
    exact, ggn = (diagonal(method, model, loss_fn, x, targets, per_sample=True) for method in ("exact", "ggn"))
    model = _backpack_fields(model, loss_fn, x, targets, BatchDiagHessian(), BatchDiagGGNExact())
    share = 1 / x.shape[0] if reduction == "mean" else 1.0  # ℓ_n's factor in the batch loss
    _assert_close({k: share * v for k, v in exact.items()}, _field(model, "diag_h_batch"))
    _assert_close({k: share * v for k, v in ggn.items()}, _field(model, "diag_ggn_exact_batch"))


# ---------------------------------------------------------------------------------------------
# Monte-Carlo methods converge to BackPACK's exact counterparts

SAMPLES = 1000


@pytest.mark.parametrize("model_name, loss_name", [("mlp-sigmoid", "ce"), ("conv2d", "mse"), ("pooled-cnn", "ce")])
def test_ggn_mc_converges_to_diag_ggn_exact(model_name, loss_name):
    model, loss_fn, x, targets = _problem(model_name, loss_name, "mean")
    generator = torch.Generator().manual_seed(0)
    few, many = (
        diagonal("ggn-mc", model, loss_fn, x, targets, mc_samples=m, generator=generator) for m in (5, SAMPLES)
    )
    exact = _field(_backpack_fields(model, loss_fn, x, targets, DiagGGNExact()), "diag_ggn_exact")
    assert max(_relative_error(many, exact).values()) < 0.05
    assert max(_relative_error(few, exact).values()) > 0.1  # a Monte-Carlo estimate, not the exact GGN


def _kflr_diagonal(parameter):
    """diag(B ⊗ A) of BackPACK's Kronecker factors [B, A] (weights) or [B] (biases), in the parameter's shape."""
    diagonals = [factor.diagonal() for factor in parameter.kflr]
    return (torch.kron(*diagonals) if len(diagonals) == 2 else diagonals[0]).reshape(parameter.shape)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kfac_converges_to_kflr_on_an_mlp(reduction):
    model, loss_fn, x, targets = _problem("mlp-sigmoid", "ce", reduction)
    generator = torch.Generator().manual_seed(0)
    kfac = diagonal("kfac", model, loss_fn, x, targets, mc_samples=SAMPLES, generator=generator)
    model = _backpack_fields(model, loss_fn, x, targets, KFLR())
    kflr = {key: _kflr_diagonal(p) for key, p in model.named_parameters()}
    assert max(_relative_error(kfac, kflr).values()) < 0.05


def test_kfac_of_a_convolution_follows_kfc_and_backpack_sums_over_positions():
    """Conv2d (T = 9 output positions) -> Flatten -> Linear -> MSE (sum), so that the GGN w.r.t.
    the convolution's output is G = 2 WᵀW for every sample (W the Linear weight) and both
    conventions have a closed form per output channel c, with N samples:

    * BackPACK's KFLR (and the exact GGN) of the bias: N Σ_{t,t'} G[(c,t), (c,t')];
    * hsbench's KFAC (KFC) of the bias: N Σ_t G[(c,t), (c,t)] (the vectors' squares, averaged over
      positions, times T);
    * both weights are (output factor of the bias) ⊗ (input factor), with the same input factor
      up to hsbench's averaging over positions: hsbench's weight / bias = BackPACK's / T.
    The Linear layer after it (one position) agrees with KFLR."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Flatten(), nn.Linear(27, 4)).double()
    loss_fn = nn.MSELoss(reduction="sum")
    x, targets = torch.randn(BATCH, 2, 4, 4, dtype=torch.float64), torch.randn(BATCH, 4, dtype=torch.float64)
    kfac = diagonal(
        "kfac", model, loss_fn, x, targets, mc_samples=4 * SAMPLES, generator=torch.Generator().manual_seed(1)
    )
    model = _backpack_fields(model, loss_fn, x, targets, KFLR(), DiagGGNExact())
    conv, linear = model[0], model[2]
    positions = 9

    g = (2 * linear.weight.T @ linear.weight).detach().reshape(3, positions, 3, positions)
    blocks = torch.stack([g[c, :, c, :] for c in range(3)])  # (C, T, T): each channel's block
    exact_bias, kfc_bias = BATCH * blocks.sum((1, 2)), BATCH * blocks.diagonal(dim1=1, dim2=2).sum(1)
    assert float((exact_bias - kfc_bias).norm() / exact_bias.norm()) > 0.2  # the conventions differ here

    torch.testing.assert_close(_kflr_diagonal(conv.bias), exact_bias, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(_kflr_diagonal(conv.bias), conv.bias.diag_ggn_exact, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(kfac["0.bias"], kfc_bias, rtol=0.05, atol=0)

    per_bias = lambda weight, bias: weight / bias[:, None, None, None]  # noqa: E731  (input factor per channel)
    torch.testing.assert_close(
        per_bias(kfac["0.weight"], kfac["0.bias"]),
        per_bias(_kflr_diagonal(conv.weight), _kflr_diagonal(conv.bias)) / positions,
        rtol=1e-9,
        atol=1e-12,
    )
    for name in ("weight", "bias"):
        assert _relative_error({name: kfac[f"2.{name}"]}, {name: _kflr_diagonal(getattr(linear, name))})[name] < 0.05
