"""Optimizers: hand-computed updates, closed forms, step-size scaling, state round trips, training."""

import copy
import math
from typing import ClassVar

import pytest
import torch
from torch import nn

from hsbench import optim
from hsbench.curvature import diagonal, diagonal_backprop, extend, native
from hsbench.data import embedded_mnist
from hsbench.engine.kind import ExperimentKind
from hsbench.engine.runner import RunOptions, execute
from hsbench.engine.spec import Run
from hsbench.engine.store import Store
from hsbench.optim import OPTIMIZERS, Diverged, make, train_step

CURVATURE = {"adahesscale": "hesscale", "adahesscale-gn": "hesscale-gn", "adabl89": "bl89", "adaggnmc": "ggn-mc"}


def small_problem(seed=0, conv=False):
    torch.manual_seed(seed)
    if conv:
        conv = (nn.Conv2d(1, 2, 3), nn.ELU(), nn.MaxPool2d(2, stride=1))
        model = nn.Sequential(*conv, nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
        x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(4, 5, dtype=torch.float64)
    return extend(model.double()), extend(nn.CrossEntropyLoss()), x, torch.tensor([0, 2, 1, 2])


def train_steps(opt, model, loss_fn, x, y, steps, seed=None):
    for t in range(steps):
        if seed is not None:
            torch.manual_seed(seed + t)
        train_step(opt, model, loss_fn, x, y)


def adam_style_by_hand(
    model, loss_fn, x, y, curvature, steps, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, seed=None
):
    """The shared update written out, with d from ``curvature(model)`` and g from autograd."""
    params = dict(model.named_parameters())
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    for t in range(1, steps + 1):
        if seed is not None:
            torch.manual_seed(seed + t - 1)
        d = curvature(model)
        grads = torch.autograd.grad(loss_fn(model(x), y), list(params.values()))
        with torch.no_grad():
            for (k, p), g in zip(params.items(), grads, strict=True):
                g = g + weight_decay * p
                m[k] = betas[0] * m[k] + (1 - betas[0]) * g
                v[k] = betas[1] * v[k] + (1 - betas[1]) * d[k] ** 2
                m_hat, v_hat = m[k] / (1 - betas[0] ** t), v[k] / (1 - betas[1] ** t)
                p -= lr * m_hat / (v_hat.sqrt() + eps)
    return model


@pytest.mark.parametrize("name", list(CURVATURE))
@pytest.mark.parametrize("conv", [False, True])
def test_two_steps_match_the_update_by_hand(name, conv):
    model, loss_fn, x, y = small_problem(conv=conv)
    expected = adam_style_by_hand(
        copy.deepcopy(model),
        loss_fn,
        x,
        y,
        lambda mdl: diagonal(CURVATURE[name], mdl, loss_fn, x, y),
        steps=2,
        lr=0.05,
        weight_decay=0.01,
        seed=7,
    )
    opt = make(name, model.parameters(), lr=0.05, weight_decay=0.01)
    train_steps(opt, model, loss_fn, x, y, 2, seed=7)
    for (k, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=k)


def exact_hessian(model, loss_fn, x, y):
    """The Hessian of the loss w.r.t. all parameters, flattened in ``model.parameters()`` order (torch.func)."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(theta):
        params = dict(zip(names, torch.split(theta, [s.numel() for s in shapes]), strict=True))
        params = {k: v.reshape(s) for (k, v), s in zip(params.items(), shapes, strict=True)}
        return loss_fn(torch.func.functional_call(model, params, (x,)), y)

    return torch.func.hessian(loss_of)(flat)


def test_adahessian_two_steps_match_the_exact_hessian_times_its_probe():
    """AdaHessian's d = |z ∘ Hz| with H the exact Hessian (torch.func) and z the probe it draws
    (one Rademacher ±1 per parameter entry, from torch's generator in parameter order)."""
    model, loss_fn, x, y = small_problem(conv=True)

    def hutchinson_abs(mdl):
        hessian = exact_hessian(mdl, loss_fn, x, y)
        z = torch.cat([(torch.randint_like(p, 2) * 2 - 1).reshape(-1) for p in mdl.parameters()])
        d = (z * (hessian @ z)).abs().split([p.numel() for p in mdl.parameters()])
        d = [di.reshape(p.shape) for di, p in zip(d, mdl.parameters(), strict=True)]
        d = [di.mean((2, 3), keepdim=True).expand_as(di) if di.dim() == 4 else di for di in d]  # conv kernels
        return dict(zip([k for k, _ in mdl.named_parameters()], d, strict=True))

    expected = adam_style_by_hand(copy.deepcopy(model), loss_fn, x, y, hutchinson_abs, 2, lr=0.15, eps=1e-4, seed=3)
    opt = make("adahessian", model.parameters())
    train_steps(opt, model, loss_fn, x, y, 2, seed=3)
    for p, q in zip(model.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_adam_and_sgd_are_torch_optimizers_with_plain_backward():
    model, loss_fn, x, y = small_problem()
    reference = copy.deepcopy(model)
    opt, ref_opt = make("adam", model.parameters(), lr=0.01), torch.optim.Adam(reference.parameters(), lr=0.01)
    for _ in range(3):
        train_steps(opt, model, loss_fn, x, y, 1)
        ref_opt.zero_grad()
        loss_fn(reference(x), y).backward()
        ref_opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), reference.parameters(), strict=True))
    assert isinstance(make("sgd", model.parameters(), lr=0.1), torch.optim.SGD)


def test_separable_quadratic_curvature_and_newton_like_step():
    """L = Σ_n Σ_i (s_n W_in − t_ni)² with one-hot inputs s_n e_n: separable, ∂²L/∂W_in² = 2 s_n²."""
    torch.manual_seed(0)
    scales = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    x, t = torch.diag(scales), torch.randn(3, 2, dtype=torch.float64)
    model = extend(nn.Sequential(nn.Linear(3, 2, bias=False)).double())
    loss_fn = extend(nn.MSELoss(reduction="sum"))
    curvature = (2 * scales**2).expand(2, 3)
    assert torch.equal(diagonal("hesscale", model, loss_fn, x, t)["0.weight"], curvature)
    opt = make("adahesscale", model.parameters(), lr=1.0, eps=0.0)
    train_steps(opt, model, loss_fn, x, t, 1)
    # first step: m̂ = g, v̂ = d², so W − g/|d| = W − (W − t/s) = t/s: the Newton step to the minimum
    torch.testing.assert_close(model[0].weight, (t / scales[:, None]).T, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", ["scaled-adahesscale", "scaled-adam"])
def test_step_size_scaling(name):
    model, loss_fn, x, y = small_problem()
    d = diagonal("hesscale", model, loss_fn, x, y)
    g = dict(zip(d, torch.autograd.grad(loss_fn(model(x), y), list(model.parameters())), strict=True))
    lr, eps = 0.1, 1e-8
    # first step: m̂ = g, v̂ = d² (AdaHesScale) or g² (Adam); h = Σ |d| U²
    updates = {k: lr * g[k] / ((d[k] if name == "scaled-adahesscale" else g[k]).abs() + eps) for k in d}
    h = float(sum((d[k].abs() * updates[k] ** 2).sum() for k in d))
    for radius, expected_scale in ((h / 4, math.sqrt(0.5)), (h / 2 * 1.0001, 1.0), (h, 1.0)):
        trial = copy.deepcopy(model)
        opt = make(name, trial.parameters(), lr=lr, eps=eps, trust_region=radius)
        train_steps(opt, trial, loss_fn, x, y, 1)
        assert opt.last_scale == pytest.approx(expected_scale, rel=1e-9)
        assert (opt.last_scale < 1) == (h > 2 * radius)
        for (k, p), p0 in zip(trial.named_parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(p, p0 - expected_scale * updates[k], rtol=1e-9, atol=1e-12)


def algorithm3_by_hand(model, loss_fn, x, y, steps, lr, radius, precondition, betas, eps=1e-8, corrected=True):
    """Algorithm 3 of the paper written out (AdaHesScale, or Adam for ``precondition="gradient"``,
    with HesScale step-size scaling), d from ``hsbench.curvature.diagonal``; returns the η of every step."""
    params = dict(model.named_parameters())
    m, v, w = ({k: torch.zeros_like(p) for k, p in params.items()} for _ in range(3))
    scales = []
    for t in range(1, steps + 1):
        d = diagonal("hesscale", model, loss_fn, x, y)
        g = dict(zip(params, torch.autograd.grad(loss_fn(model(x), y), list(params.values())), strict=True))
        u, h = {}, 0.0
        for k in params:
            m[k] = betas[0] * m[k] + (1 - betas[0]) * g[k]
            v[k] = betas[1] * v[k] + (1 - betas[1]) * d[k] ** 2
            w[k] = betas[1] * w[k] + (1 - betas[1]) * g[k] ** 2
            v_hat = v[k] / (1 - betas[1] ** t)
            denominator = v_hat if precondition == "curvature" else w[k] / (1 - betas[1] ** t)
            u[k] = lr * (m[k] / (1 - betas[0] ** t)) / (denominator.sqrt() + eps)
            h += float(((v_hat if corrected else v[k]).sqrt() * u[k] ** 2).sum())
        scales.append(min(1.0, math.sqrt(2 * radius / h)))
        with torch.no_grad():
            for k, p in params.items():
                p -= scales[-1] * u[k]
    return scales


SOMETIMES_BINDING = {  # a trust-region radius Δ with η < 1 at some of the steps below, η = 1 at others
    ("scaled-adahesscale", True): 3e-3,
    ("scaled-adam", True): 3e-3,
    ("scaled-adahesscale", False): 1e-3,
    ("scaled-adam", False): 5e-4,
}


@pytest.mark.parametrize("name", ["scaled-adahesscale", "scaled-adam"])
@pytest.mark.parametrize("regime", ["always", "sometimes", "never"])  # η < 1 at every step, at some, never
@pytest.mark.parametrize("corrected", [True, False])
def test_scaled_optimizers_follow_algorithm_3_over_several_steps(name, regime, corrected):
    radius = {"always": 1e-6, "sometimes": SOMETIMES_BINDING[name, corrected], "never": 1e3}[regime]
    model, loss_fn, x, y = small_problem()
    lr, betas, steps = 0.05, (0.9, 0.99), 6
    expected = copy.deepcopy(model)
    precondition = "curvature" if name == "scaled-adahesscale" else "gradient"
    scales = algorithm3_by_hand(expected, loss_fn, x, y, steps, lr, radius, precondition, betas, corrected=corrected)
    hyper = {"lr": lr, "betas": betas, "trust_region": radius, "trust_region_bias_correction": corrected}
    opt = make(name, model.parameters(), **hyper)
    for t in range(steps):
        train_step(opt, model, loss_fn, x, y)
        assert opt.last_scale == pytest.approx(scales[t], rel=1e-9), t
    for (k, p), q in zip(model.named_parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=k)
    if regime == "sometimes":
        assert min(scales) < 1 and max(scales) == 1, scales
    elif regime == "always":
        assert max(scales) < 1, scales
    else:
        assert min(scales) == 1, scales


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trip_continues_bit_identically(name):
    model, loss_fn, x, y = small_problem(conv=True)
    opt = make(name, model.parameters(), lr=0.01)
    train_steps(opt, model, loss_fn, x, y, 3, seed=0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train_steps(opt, model, loss_fn, x, y, 3, seed=100)

    resumed, *_ = small_problem(conv=True, seed=1)  # different initial weights, overwritten below
    resumed.load_state_dict(saved_model)
    opt2 = make(name, resumed.parameters(), lr=0.01)
    opt2.load_state_dict(saved_opt)
    train_steps(opt2, resumed, loss_fn, x, y, 3, seed=100)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters(), strict=True))


DIAGONAL_ADAM = [name for name, cls in OPTIMIZERS.items() if issubclass(cls, optim.DiagonalAdam)]


@pytest.mark.parametrize("name", DIAGONAL_ADAM)
@pytest.mark.parametrize("batch", [1, 4])  # 1: the linear weights' diagonals are rank-one factors
@pytest.mark.parametrize("join_below", [optim._JOIN_BELOW, 10])  # 10: the weights alone, the biases joined
def test_parameters_stepped_together_equal_one_at_a_time(name, batch, join_below, monkeypatch):
    """Where the C loop does not serve them (``optim._NativeUpdate``: no compiler, another device),
    the step joins the small parameters into one vector (``optim._Batch``): the same numbers, bit
    for bit, as parameter by parameter, and the moments stay views of one flat buffer."""
    one_by_one = staticmethod(
        lambda items, *args, group=optim._Batch.group: [b for i in items for b in group([i], *args)]
    )

    def train(together: bool):
        model, loss_fn, x, y = small_problem(conv=True)  # 4-D, 2-D and 1-D parameters
        monkeypatch.setattr(optim, "_JOIN_BELOW", join_below)
        monkeypatch.setattr(optim._NativeUpdate, "applies", lambda self, item: False)
        if not together:
            monkeypatch.setattr(optim._Batch, "group", one_by_one)
        opt = make(name, model.parameters(), lr=0.01, **({"trust_region": 1e-8} if "scaled" in name else {}))
        scales, buffers = [], []
        for t in range(3):
            torch.manual_seed(t)
            train_step(opt, model, loss_fn, x[:batch], y[:batch])
            scales.append(opt.last_scale)
            joined = [p for p in model.parameters() if p.numel() < join_below]
            buffers.append({opt.state[p][m]._base for p in joined for m in ("exp_avg", "exp_avg_sq")})
        monkeypatch.undo()
        return model, opt, scales, buffers

    (model, opt, scales, buffers), (model1, opt1, scales1, _) = train(True), train(False)
    assert scales == scales1 and ("scaled" not in name or max(scales) < 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model1.parameters(), strict=True))
    assert same(opt.state_dict(), opt1.state_dict())
    assert len(buffers[0]) == 2 and None not in buffers[0] and buffers[0] == buffers[1] == buffers[2]  # made once


@pytest.mark.parametrize("name", DIAGONAL_ADAM)
@pytest.mark.parametrize("compiled", [False, True])  # True: the weights take the compiled step (in place)
def test_a_loaded_state_shares_no_memory_with_its_source(name, compiled, monkeypatch):
    """The step writes moments in place and torch's ``load_state_dict`` keeps the given tensors:
    ours copies them, so neither optimizer's steps change the other's state."""
    if compiled:
        monkeypatch.setattr(optim._CompiledUpdate, "MIN_SIZE", 20)
    model, loss_fn, x, y = small_problem(conv=True)
    opt = make(name, model.parameters(), lr=0.01)
    train_steps(opt, model, loss_fn, x, y, 2, seed=0)
    twin = copy.deepcopy(model)
    opt2 = make(name, twin.parameters(), lr=0.01)
    opt2.load_state_dict(opt.state_dict())  # no copy
    before, loaded = copy.deepcopy(opt.state_dict()), copy.deepcopy(opt2.state_dict())
    train_steps(opt2, twin, loss_fn, x, y, 2, seed=2)
    assert same(opt.state_dict(), before)
    after = copy.deepcopy(opt2.state_dict())
    opt2.load_state_dict(loaded)
    train_steps(opt, model, loss_fn, x, y, 2, seed=2)  # the first goes on as the second did
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    assert same(opt.state_dict(), after) and same(opt2.state_dict(), loaded)


@pytest.mark.parametrize("name", DIAGONAL_ADAM)
def test_a_deepcopied_optimizer_steps_as_the_original(name):
    """``copy.deepcopy`` keeps the step-size scaling's settings (torch's ``__getstate__`` alone
    drops them), and the copy joins its own moments (it never writes the original's)."""
    model, loss_fn, x, y = small_problem(conv=True)
    opt = make(name, model.parameters(), lr=0.01, **({"trust_region": 1e-8} if "scaled" in name else {}))
    train_steps(opt, model, loss_fn, x, y, 2, seed=0)
    model2, opt2 = copy.deepcopy((model, opt))
    before = copy.deepcopy(opt.state_dict())
    train_steps(opt2, model2, loss_fn, x, y, 2, seed=2)
    assert same(opt.state_dict(), before)
    train_steps(opt, model, loss_fn, x, y, 2, seed=2)
    assert opt2.last_scale == opt.last_scale and ("scaled" not in name or opt.last_scale < 1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters(), strict=True))


def test_an_overflowing_sum_for_the_step_size_scaling_is_divergence():
    """h summed from finite per-parameter sums can overflow (``math.fsum`` raises): Diverged,
    nothing changed."""

    class Fixed(optim.DiagonalAdam):
        def curvature_backward(self, loss):
            for p in self._parameters():
                p.grad = torch.full_like(p, 1.3e152)
            return {p: torch.ones_like(p) for p in self._parameters()}

    params = [nn.Parameter(torch.zeros(10000, dtype=torch.float64)) for _ in range(2)]
    opt = Fixed(params, lr=1.0, trust_region=1.0)
    opt.backward(torch.tensor(0.0))
    with pytest.raises(Diverged, match="not finite"):
        opt.step()
    assert not opt.state and all(bool((p == 0).all()) for p in params)


@pytest.mark.parametrize("name", DIAGONAL_ADAM)
def test_a_step_without_gradients_and_state_entries_of_others_are_fine(name):
    """A step where none of the optimizer's parameters has a gradient changes nothing; state
    entries the update does not use (e.g. from another optimizer's state) are kept as they are."""
    model, loss_fn, x, y = small_problem(conv=True)
    model[0].requires_grad_(False)
    frozen = make(name, model[0].parameters(), lr=0.01)
    weight = model[0].weight.clone()
    train_step(frozen, model, loss_fn, x, y)
    assert torch.equal(model[0].weight, weight) and not frozen.state
    opt = make(name, model[-1].parameters(), lr=0.01)
    train_step(opt, model, loss_fn, x, y)
    for p in model[-1].parameters():
        opt.state[p]["max_exp_avg_sq"] = torch.full_like(p, 7.0)
    train_step(opt, model, loss_fn, x, y)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # the moments joined anew
    train_step(opt, model, loss_fn, x, y)
    assert all(
        opt.state[p]["step"] == 3 and bool((opt.state[p]["max_exp_avg_sq"] == 7).all()) for p in model[-1].parameters()
    )


HYPER = {
    "sgd": {"lr": 0.5},
    "adahessian": {"lr": 0.05},
    # BL89's output diagonal is zero off the target class, so weights that no target of the batch
    # touches get d = 0 and a step of lr·m̂/ε: it needs a larger ε to be stable
    "adabl89": {"lr": 1e-3, "eps": 1e-4},
    "scaled-adahesscale": {"lr": 0.01, "trust_region": 1e-3},
    "scaled-adam": {"lr": 0.01, "trust_region": 1e-3},
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_lowers_the_loss_on_real_digits(name):
    images, labels = embedded_mnist()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:1000]
    x, y = images[order].flatten(1), labels[order]
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10)))
    loss_fn = extend(nn.CrossEntropyLoss())
    opt = make(name, model.parameters(), **HYPER.get(name, {"lr": 0.01}))
    with torch.no_grad():
        before = float(loss_fn(model(x), y))
    for step in range(60):
        batch = slice(32 * step % 992, 32 * step % 992 + 32)
        train_steps(opt, model, loss_fn, x[batch], y[batch], 1)
    with torch.no_grad():
        after = float(loss_fn(model(x), y))
    assert after < 0.7 * before, (before, after)


# ---------------------------------------------------------------------------------------------
# misuse and bad input


def same(a, b) -> bool:
    """Equality of nested state (dicts, lists, tensors, numbers)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_divergence_raises_before_changing_parameters_or_state(name):
    model, loss_fn, x, y = small_problem(conv=True)
    opt = make(name, model.parameters(), lr=0.01)
    train_steps(opt, model, loss_fn, x, y, 2, seed=0)
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    nan_input = x.clone()
    nan_input[1, 0, 2, 2] = math.nan
    with pytest.raises(Diverged, match="loss is"):
        train_step(opt, model, loss_fn, nan_input, y)
    assert same(model.state_dict(), params) and same(opt.state_dict(), state)
    opt.zero_grad()
    opt.backward(loss_fn(model(x), y))  # a finite loss, and a gradient that is not
    model[-1].weight.grad[0, 1] = math.inf
    with pytest.raises(Diverged, match="not finite"):
        opt.step()
    assert same(model.state_dict(), params) and same(opt.state_dict(), state)
    assert issubclass(Diverged, FloatingPointError)


def test_step_without_backward_is_an_error():
    model, loss_fn, x, y = small_problem()
    opt = make("adahesscale", model.parameters())
    loss_fn(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"call opt.backward\(loss\)"):
        opt.step()


def test_unextended_model_or_modified_loss_is_an_error():
    model, loss_fn, x, y = small_problem()
    opt = make("adahesscale-gn", model.parameters())
    with pytest.raises(RuntimeError, match=r"extend.*found PowBackward0"):
        opt.backward(loss_fn(model(x), y) ** 2)
    plain = nn.Sequential(nn.Linear(5, 3)).double()
    opt = make("adahesscale", plain.parameters())
    with pytest.raises(RuntimeError, match="extend"):
        opt.backward(loss_fn(plain(x), y))


def test_parameters_outside_the_recorded_chain_are_reported():
    model, loss_fn, x, y = small_problem()
    opt = make("adahesscale", model.parameters())
    with pytest.raises(RuntimeError, match="not reached"):
        opt.backward(loss_fn(model[2](torch.tanh(model[0](x))), y))  # the chain is broken by torch.tanh


def test_extended_max_pooling_still_returns_a_tensor():
    """extend() makes max pooling hand its indices to the recording hook, which passes on the output."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ELU(), nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(8, 3))
    extended = extend(copy.deepcopy(plain))
    x = torch.randn(4, 1, 5, 5)
    with torch.no_grad():
        assert torch.equal(extended(x), plain(x))
    assert torch.equal(extended(x), plain(x))


def test_unsupported_module_is_rejected_at_extend():
    with pytest.raises(ValueError, match="BatchNorm1d at position '1'"):
        extend(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)))


@pytest.mark.parametrize(
    "hyper,field",
    [
        ({"lr": -1.0}, "lr"),
        ({"betas": (1.0, 0.9)}, r"betas\[0\]"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\]"),
        ({"eps": -1e-8}, "eps"),
        ({"trust_region": 0.0}, "trust_region"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"momentum_typo": 0.9}, "momentum_typo"),
    ],
)
def test_invalid_hyperparameters_name_the_argument(hyper, field):
    model, *_ = small_problem()
    name = "scaled-adam" if "trust_region" in hyper else "adahesscale"
    with pytest.raises(ValueError, match=field):
        make(name, model.parameters(), **hyper)


def test_unknown_optimizer_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"adahesscale-gn.*scaled-adam"):
        make("adahesscale2", [torch.zeros(1, requires_grad=True)])


class DivergingKind(ExperimentKind):
    """A kind whose training step meets a NaN input, and which does not catch ``Diverged``."""

    name = "diverging"
    description = "one adam step on a NaN batch"
    fields: ClassVar[dict] = {}

    def run(self, settings, ctx):
        model = nn.Linear(2, 1)
        nan_batch = torch.full((3, 2), math.nan)
        train_step(make("adam", model.parameters()), model, nn.MSELoss(), nan_batch, torch.zeros(3, 1))
        return {}

    def plot(self, df, spec, outdir):
        return []


def test_the_engine_records_an_optimizers_divergence_as_diverged(tmp_path):
    """The engine does not import hsbench.optim: it records any FloatingPointError as ``diverged``."""
    run = Run("0123456789abcdef", "diverging", f"{__name__}:DivergingKind", {"seed": 0, "scale": "default"})
    assert execute(run, RunOptions(tmp_path)) == "diverged"
    record = Store(tmp_path, "diverging").read_run(run)
    assert record["status"] == "diverged" and record["error"].startswith("Diverged: Adam.backward: the loss is nan")


@pytest.mark.parametrize("name", ["adahesscale", "scaled-adahesscale", "scaled-adam"])
def test_an_overflowing_second_moment_alone_is_divergence(name):
    """In float32, a loss scaled by 1e25 has finite gradients (so finite first moments) but squared
    curvatures or gradients beyond 3.4e38: v̂ = inf makes the move m̂ / (√v̂ + ε) a finite zero, so
    only a check of v itself sees it; nothing may change."""
    model, loss_fn, x, y = small_problem()
    model.float()
    opt = make(name, model.parameters(), lr=0.01)
    train_steps(opt, model, loss_fn, x.float(), y, 1)
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    opt.backward(1e25 * loss_fn(model(x.float()), y))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.raises(Diverged, match="not finite"):
        opt.step()
    assert same(model.state_dict(), params) and same(opt.state_dict(), state)


@pytest.mark.parametrize("caller_flushes", [False, True])
def test_curvature_optimizers_flush_subnormals_inside_and_restore_the_callers_mode(caller_flushes, monkeypatch):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormal floats")
    subnormal = torch.tensor([1e-39], dtype=torch.float32)
    flushing = lambda: float(subnormal * 1.0) == 0.0  # noqa: E731
    seen = []
    walk, update = diagonal_backprop.backpropagate, optim._new_state

    def spying(function, name):  # records whether subnormals flush to zero while ``function`` runs
        def spy(*args, **kwargs):
            seen.append((name, flushing()))
            return function(*args, **kwargs)

        return spy

    monkeypatch.setattr(diagonal_backprop, "backpropagate", spying(walk, "backpropagate"))
    monkeypatch.setattr(optim, "_new_state", spying(update, "update"))  # the eager update
    monkeypatch.setattr(native.UpdatePasses, "sums", spying(native.UpdatePasses.sums, "update"))  # the C loop's
    model, loss_fn, x, y = small_problem(conv=False)
    opt = make("adahesscale", model.parameters())
    torch.set_flush_denormal(caller_flushes)
    try:
        train_step(opt, model, loss_fn, x, y)
        after = flushing()
    finally:
        torch.set_flush_denormal(False)
    assert set(seen) == {("backpropagate", True), ("update", True)} and after == caller_flushes
