"""The approx-quality kind (figure 2) end to end at smoke scale, through the CLI."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hsbench import results
from hsbench.cli import main
from hsbench.experiments.approx_quality import ApproxQuality
from hsbench.experiments.networks import mlp


@pytest.mark.parametrize("spec", ["figure2", "figure2-random", "figure2-cnn"])
def test_smoke_scale_runs_and_plots(spec, tmp_path):
    args = ["--scale", "smoke", "--results", str(tmp_path / "results")]
    assert main(["run", spec, *args]) == 0
    df = results.load(spec, tmp_path / "results", scale="smoke")
    assert (df["status"] == "ok").all() and len(df) >= 2
    normalized = lambda label: df[f"l1/{label}"] / df["l1/hesscale"]  # noqa: E731
    assert ((df["l1/hesscale"] > 0) & (df["l1/hesscale"] < df["norm_diag"])).all()  # better than guessing 0
    assert (normalized("bl89") > 1).all() and (normalized("hutchinson-1") > 1).all()
    last_layer = df["l1_layers/hesscale"].map(lambda layers: layers[-1])
    assert (last_layer < 1e-12 * df["l1/hesscale"]).all()  # exact diagonal at the last layer
    assert main(["plot", spec, *args, "--plots", str(tmp_path / "plots")]) == 0
    stem = spec + ("-" if "-" in spec else "")
    for suffix in ("a.png", "a.pdf", "b.png", "b.pdf"):
        assert (tmp_path / "plots" / "smoke" / f"{stem}{suffix}").stat().st_size > 1000


def test_torchvision_mnist_from_a_data_directory_and_a_clear_error_without(tmp_path):
    from fake_data import N_TRAIN, write_mnist

    from hsbench.data import mnist_like

    write_mnist(tmp_path)
    x, y, source = mnist_like("mnist", tmp_path)
    assert x.shape == (N_TRAIN, 1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1 and y.shape == (N_TRAIN,)
    assert str(tmp_path) in source
    with pytest.raises(FileNotFoundError, match=r"emnist not found in .*hsbench download emnist --data-dir"):
        mnist_like("emnist", tmp_path / "missing")


def exact_hessian_diagonal(model, loss_fn, x, y) -> list[torch.Tensor]:
    """The diagonal of the loss's Hessian w.r.t. all parameters (torch.func), one tensor per parameter."""
    named = list(model.named_parameters())
    sizes = [p.numel() for _, p in named]

    def loss_of(theta):
        params = {k: t.reshape(p.shape) for (k, p), t in zip(named, torch.split(theta, sizes), strict=True)}
        return loss_fn(torch.func.functional_call(model, params, (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return list(torch.diagonal(torch.func.hessian(loss_of)(flat)).split(sizes))


def test_norm_diag_is_the_mean_l1_norm_of_the_exact_diagonal_along_the_sgd_run():
    """Figure 2's |diag(H)| reference, recomputed: same examples and initialization, SGD written
    out, exact Hessian diagonals from torch.func, L1 norm per layer averaged over the examples."""
    seed, examples, lr = 5, 3, 0.5
    settings = {name: field.default for name, field in ApproxQuality.fields.items()}
    settings |= {"data": "random", "inputs": 4, "classes": 3, "width": 5, "depth": 2}
    settings |= {"examples": examples, "sgd_lr": lr, "mc_large": 2}
    ctx = SimpleNamespace(seed=seed, device="cpu", data_dir=None, load_checkpoint=lambda: None)
    ctx.checkpoint_due = lambda: False
    metrics = ApproxQuality().run(settings, ctx)

    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = torch.randn(examples, 4, generator=gen).double(), torch.randint(0, 3, (examples,), generator=gen)
    order = torch.randint(0, examples, (examples,), generator=gen)
    torch.manual_seed(seed)
    model, loss_fn = mlp(4, 5, 2, 3, "tanh").double(), nn.CrossEntropyLoss()
    layers = torch.zeros(3, dtype=torch.float64)  # 3 Linear layers, weight and bias each
    for i in order:
        x, y = x_all[i : i + 1], y_all[i : i + 1]
        diag = exact_hessian_diagonal(model, loss_fn, x, y)
        layers += torch.stack([d.abs().sum() for d in diag]).reshape(3, 2).sum(1)
        grads = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= lr * g
    found = torch.tensor(metrics["norm_diag_layers"], dtype=torch.float64)
    torch.testing.assert_close(found, layers / examples, rtol=1e-10, atol=0)
    assert metrics["norm_diag"] == pytest.approx(float(layers.sum()) / examples, rel=1e-10)
    assert len(set(order.tolist())) > 1  # the run meets more than one example
