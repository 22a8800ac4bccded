"""Issue 16's measurements during training: the traces of diag-dominance and approx-quality equal the
end-of-training computations at the same iteration; the Gauss-Newton part, scikit-learn's digits, the
Kaiming-with-biases initialization; the new specs' smoke scales through the CLI."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from hsbench.cli import main
from hsbench.experiments.approx_quality import ApproxQuality
from hsbench.experiments.diag_dominance import DiagDominance, pre_activation_hessians, record_iterations
from hsbench.experiments.networks import mlp


def run(kind, seed: int, **changes):
    settings = {name: field.default for name, field in kind.fields.items()} | changes
    ctx = SimpleNamespace(seed=seed, device="cpu", data_dir=None)
    ctx.load_checkpoint, ctx.checkpoint_due = lambda: None, lambda: False
    return kind.run(settings, ctx)


def test_record_iterations_are_zero_and_log_spaced_up_to_the_last():
    assert record_iterations(1000, 4) == [0, 1, 10, 100, 1000]
    assert record_iterations(5, 10) == [0, 1, 2, 3, 4, 5]  # rounded duplicates merged
    assert record_iterations(1000, 0) == []


def test_rho_during_training_equals_rho_after_a_run_stopped_at_that_iteration():
    small = {"data": "digits-sklearn", "width": 6, "depth": 2, "eval_examples": 3, "held_out": 50, "lr": 0.5}
    traced = run(DiagDominance(), 4, iterations=12, record_points=3, **small)
    assert traced["record_iterations"] == [0, 1, 3, 12]
    assert traced["rho"][0] == traced["rho_before"] and traced["rho"][-1] == traced["rho_after"]
    for k, t in enumerate(traced["record_iterations"]):
        stopped = run(DiagDominance(), 4, iterations=t, **small)
        assert traced["rho"][k] == pytest.approx(stopped["rho_after"], rel=1e-12, abs=0)
    assert traced["rho"][1] != traced["rho"][-1]  # training moved it
    assert traced["train_size"] == 1797 - 50 and len(traced["held_out_rho"]) == 4
    assert traced["held_out_rho"][0] != traced["rho"][0]  # other examples


def test_gauss_newton_part_is_the_ggn_with_respect_to_pre_activations():
    """G = Jᵀ ∇²_z ℓ J with J = ∂z/∂a (z the network output, a a hidden pre-activation), from torch.func:
    the Hessian without the σ''·∂ℓ/∂h terms of every activation above a."""
    torch.manual_seed(0)
    model = mlp(5, 4, 2, 3, "tanh", "kaiming-bias").double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(2, 5, dtype=torch.float64), torch.tensor([1, 2])
    found = pre_activation_hessians(model, loss_fn, x, y, gauss_newton=True)
    hessians = pre_activation_hessians(model, loss_fn, x, y)
    for layer, start in enumerate((2, 4)):  # pre-activation = output of model[start - 1]
        for n in range(2):
            a = model[:start](x[n : n + 1]).detach()[0]
            jacobian = torch.func.jacfwd(lambda u, start=start: model[start:](u.unsqueeze(0))[0])(a)
            z = model[start:](a.unsqueeze(0)).detach()[0]
            output_hessian = torch.func.hessian(lambda v, n=n: loss_fn(v.unsqueeze(0), y[n : n + 1]))(z)
            torch.testing.assert_close(found[layer][n], jacobian.T @ output_hessian @ jacobian)
            assert not torch.allclose(found[layer][n], hessians[layer][n])  # the σ'' terms are not zero


def test_error_trace_blocks_equal_runs_of_that_many_examples():
    """Block b of a traced run is figure 2's mean error over the steps of that block: its first block
    equals a run of one block's length, the mean of equal blocks the whole run's mean."""
    small = {"width": 3, "depth": 1, "mc_large": 2}
    short = run(ApproxQuality(), 2, examples=4, **small)
    traced = run(ApproxQuality(), 2, examples=12, record_every=4, **small)
    whole = run(ApproxQuality(), 2, examples=12, **small)
    assert traced["trace_iterations"] == [0, 4, 8] and traced["train_size"] == 5000
    for label in ("hesscale", "bl89", "ggn-mc-2", "hutchinson-1"):
        assert traced[f"l1_trace/{label}"][0] == pytest.approx(short[f"l1/{label}"], rel=1e-12)
        assert np.mean(traced[f"l1_trace/{label}"]) == pytest.approx(whole[f"l1/{label}"], rel=1e-12)
        assert traced[f"l1/{label}"] == whole[f"l1/{label}"]  # tracing changes nothing else
    assert np.mean(traced["norm_diag_trace"]) == pytest.approx(whole["norm_diag"], rel=1e-12)


def test_measuring_every_kth_example_averages_those_examples_only():
    small = {"width": 3, "depth": 1, "mc_large": 2}
    sparse = run(ApproxQuality(), 1, examples=6, measure_every=3, record_every=3, **small)
    assert sparse["trace_iterations"] == [0, 3]
    first = run(ApproxQuality(), 1, examples=1, **small)  # step 0 is the first measured one
    assert sparse["l1_trace/hesscale"][0] == pytest.approx(first["l1/hesscale"], rel=1e-12)
    assert sparse["l1/hesscale"] == pytest.approx(np.mean(sparse["l1_trace/hesscale"]), rel=1e-12)


def test_sklearn_digits_are_the_scaled_8x8_images():
    from sklearn.datasets import load_digits

    from hsbench.data import mnist_like

    x, y, source = mnist_like("digits-sklearn", None)
    digits = load_digits()
    assert x.shape == (1797, 1, 8, 8) and "scikit-learn" in source
    torch.testing.assert_close(x[5, 0], torch.tensor(digits.images[5] / 16, dtype=torch.float32))
    assert y.tolist() == digits.target.tolist()


def test_kaiming_bias_draws_biases_with_the_weights_standard_deviation():
    torch.manual_seed(0)
    with_biases, zero_biases = mlp(400, 300, 1, 10, "tanh", "kaiming-bias"), mlp(400, 300, 1, 10, "tanh", "kaiming")
    std = (5 / 3) / 400**0.5  # tanh gain / √fan_in
    assert float(with_biases[1].weight.detach().std()) == pytest.approx(std, rel=0.02)
    assert float(with_biases[1].bias.detach().std()) == pytest.approx(std, rel=0.15)
    assert float(zero_biases[1].bias.abs().max()) == 0.0


@pytest.mark.parametrize("spec", ["table1-training", "figure2-training"])
def test_smoke_scales_run_and_plot(spec, tmp_path):
    args = ["--scale", "smoke", "--results", str(tmp_path / "results")]
    assert main(["run", spec, *args]) == 0
    assert main(["plot", spec, *args, "--plots", str(tmp_path / "plots")]) == 0
    for suffix in (".png", ".pdf", ".csv", ".md"):
        assert (tmp_path / "plots" / "smoke" / f"{spec}{suffix}").stat().st_size > 100
