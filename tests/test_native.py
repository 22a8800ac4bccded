"""The compiled loops (``hsbench.curvature.native``) against the eager computations they replace."""

import math
import shutil

import pytest
import torch
from torch import nn

from hsbench import optim
from hsbench.curvature import autograd_estimators, extend, loss_diagonals, native
from hsbench.curvature.modules import RankOne

needs_loops = pytest.mark.skipif(not native.available(torch.float64), reason="no C compiler: the loops are off")


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """Compile into an empty cache folder, forgetting any library loaded before."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    native._library.cache_clear()
    yield tmp_path / "hsbench"
    native._library.cache_clear()


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(512, 64), (100, 513), (256, 257)])
def test_the_kernel_gives_the_eager_products(dtype, shape, fresh_library):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=generator, dtype=dtype)
    g, s = torch.randn(2, shape[0], generator=generator, dtype=dtype)
    found = native.linear_pullbacks(w, g, s)
    assert found is not None
    assert [p.name for p in fresh_library.iterdir()] == [p.name for p in fresh_library.glob("native-*.so")]
    torch.testing.assert_close(found[0], g @ w)
    torch.testing.assert_close(found[1], s @ w.square())


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("probes, rows, blocks, inputs", [(1, 3, 2, 1), (7, 5, 3, 2), (51, 32, 45, 1)])
def test_the_probe_loops_give_the_products_of_the_unpacked_probes(dtype, probes, rows, blocks, inputs):
    generator = torch.Generator().manual_seed(0)
    packed = torch.randint(0, 256, (probes, rows, blocks), dtype=torch.uint8, generator=generator)
    z = autograd_estimators._SIGNS[packed.long()].flatten(-2).to(dtype)  # (probes, rows, 8 blocks), bit k: entry 8b + k
    h = torch.randn(inputs, 8 * blocks, generator=generator, dtype=dtype)
    a = torch.randn(probes, rows, generator=generator, dtype=dtype)
    eps = torch.finfo(dtype).eps  # sums of ±terms: rounding relative to the sum of the terms' sizes
    found, expected = native.probe_products(packed.flatten(0, 1), h), z.flatten(0, 1) @ h.T
    torch.testing.assert_close(found, expected, rtol=0, atol=8 * eps * float(h.abs().sum(1).max()))
    found, expected = native.probe_contraction(packed, a), (a.unsqueeze(2) * z).sum(0)
    torch.testing.assert_close(found, expected, rtol=0, atol=8 * eps * float(a.abs().sum(0).max()))


@needs_loops
def test_tensors_the_kernel_does_not_serve_get_none(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    big = torch.randn(native.PARALLEL_FROM // 256, 256)
    g, s = torch.randn(2, big.shape[0])
    assert native.linear_pullbacks(big, g, s) is not None
    small = torch.randn(native.SERVES_FROM // 128 - 1, 128)
    assert native.linear_pullbacks(small, g[: len(small)], s[: len(small)]) is None
    assert native.linear_pullbacks(big.T.contiguous().T, g, s) is None  # strided
    assert native.linear_pullbacks(big.half(), g.half(), s.half()) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # several threads: torch's parallel products
    assert native.linear_pullbacks(big, g, s) is None
    assert native.linear_pullbacks(big[:-1], g[:-1], s[:-1]) is not None  # below PARALLEL_FROM
    assert native.linear_pullbacks(big.to("meta"), g, s) is None  # not on the CPU


@needs_loops
def test_arguments_that_do_not_fit_are_value_errors():
    w, g = torch.randn(256, 256), torch.randn(256)
    packed, h, a = torch.zeros(4, 3, 2, dtype=torch.uint8), torch.randn(1, 16), torch.randn(4, 3)
    with pytest.raises(ValueError, match="g and s must have the weight's rows"):
        native.linear_pullbacks(w, torch.randn(2, 256), torch.randn(2, 256))
    with pytest.raises(ValueError, match="one float dtype"):
        native.linear_pullbacks(w, g.double(), g)
    with pytest.raises(ValueError, match=r"h must be \(N, 8B\)"):
        native.probe_products(packed.flatten(0, 1), torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"a must be \(M, I\)"):
        native.probe_contraction(packed, a.T)
    with pytest.raises(ValueError, match="one float dtype"):
        native.probe_contraction(packed.float(), a)
    assert native.probe_products(packed.flatten(0, 1), h).shape == (12, 1)


def test_without_a_compiler_the_products_are_eager_with_a_warning(monkeypatch, fresh_library):
    monkeypatch.delenv("HSBENCH_NATIVE", raising=False)
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.setenv("CC", str(fresh_library / "no-such-compiler"))
    w, g, s = torch.randn(256, 256), torch.randn(256), torch.randn(256)
    with pytest.warns(UserWarning, match="compiled loops unavailable, computed eagerly"):
        assert native.linear_pullbacks(w, g, s) is None
    monkeypatch.delenv("CC")
    native._library.cache_clear()
    monkeypatch.setenv("HSBENCH_NATIVE", "0")
    assert native.linear_pullbacks(w, g, s) is None
    assert not native.available(torch.float64)


@needs_loops
def test_a_compiler_command_with_options_is_split(monkeypatch, fresh_library):
    monkeypatch.setenv("CC", f"{shutil.which('cc') or shutil.which('gcc')} -Wall")
    assert native.available(torch.float32)
    assert len(list(fresh_library.glob("native-*.so"))) == 1


@needs_loops
@pytest.mark.parametrize("variant", ["hesscale", "hesscale-gn", "bl89"])
def test_the_walk_with_the_kernel_equals_the_walk_without(variant, monkeypatch):
    """Batch size one, factored diagonals (as the optimizers take them), walked in Python (where
    ``diagonal_walk`` does not serve): a network whose middle layer is large enough for the kernel."""
    monkeypatch.setattr(native, "diagonal_walk", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 5)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(1, 8), torch.tensor([3])
    served = []
    kernel = native.linear_pullbacks

    def spy(*args):
        result = kernel(*args)
        served.append(result is not None)
        return result

    monkeypatch.setattr(native, "linear_pullbacks", spy)
    found = loss_diagonals(loss_fn(model(x), y), variant, factored=True)
    assert served == [False, True]  # output layer (too small), middle layer; the first needs no input part
    monkeypatch.setattr(native, "linear_pullbacks", lambda *args: None)
    eager = loss_diagonals(loss_fn(model(x), y), variant, factored=True)
    for p, d in found.diagonals.items():
        e = eager.diagonals[p]
        assert isinstance(d, RankOne) == isinstance(e, RankOne) == (p.dim() == 2)
        torch.testing.assert_close(d.materialize() if p.dim() == 2 else d, e.materialize() if p.dim() == 2 else e)
        torch.testing.assert_close(found.gradients[p], eager.gradients[p])


def _chain(name: str, dtype: torch.dtype) -> tuple[nn.Sequential, nn.Module, torch.Tensor, torch.Tensor]:
    """Networks of linear layers and activations whose pullbacks are all large enough for
    ``linear_pullbacks`` (so that the torch walk sums in the compiled walk's order), batch size one."""
    torch.manual_seed(0)
    if name == "tanh":
        layers = [nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 130)]
    elif name == "sigmoid, no bias, a frozen weight":
        layers = [nn.Linear(8, 256, bias=False), nn.Sigmoid(), nn.Linear(256, 256), nn.Sigmoid(), nn.Linear(256, 130)]
        layers[2].weight.requires_grad_(False)
    else:  # derivatives handed to the loop, an activation after the last layer
        layers = [nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ELU(), nn.Linear(256, 130), nn.Tanh()]
    model = extend(nn.Sequential(*layers).to(dtype))
    if name.startswith("relu"):
        return model, extend(nn.MSELoss()), torch.randn(1, 8, dtype=dtype), torch.randn(1, 130, dtype=dtype)
    return model, extend(nn.CrossEntropyLoss()), torch.randn(1, 8, dtype=dtype), torch.tensor([3])


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("network", ["tanh", "sigmoid, no bias, a frozen weight", "relu, elu, tanh output"])
@pytest.mark.parametrize("variant", ["hesscale", "hesscale-gn", "bl89"])
def test_the_compiled_walk_equals_the_torch_walk_bit_for_bit(variant, network, dtype, monkeypatch):
    model, loss_fn, x, y = _chain(network, dtype)
    kernel, served = native.diagonal_walk, []

    def spy(*args, **kwargs):
        found = kernel(*args, **kwargs)
        served.append(None if found is None else [sums.grad is None for sums in found])
        return found

    monkeypatch.setattr(native, "diagonal_walk", spy)
    compiled = loss_diagonals(loss_fn(model(x), y), variant, factored=True)
    assert served == [[False, "frozen" in network, False]]  # last layer first: no gradient for the frozen weight
    monkeypatch.setattr(native, "diagonal_walk", lambda *args, **kwargs: None)
    walked = loss_diagonals(loss_fn(model(x), y), variant, factored=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert list(compiled.gradients) == list(walked.gradients) and set(compiled.diagonals) == set(trainable)
    for p in trainable:
        assert torch.equal(compiled.gradients[p], walked.gradients[p])
        d, e = compiled.diagonals[p], walked.diagonals[p]
        assert isinstance(d, RankOne) == isinstance(e, RankOne) == (p.dim() == 2)
        assert torch.equal(d.materialize(), e.materialize()) if p.dim() == 2 else torch.equal(d, e)


@needs_loops
@pytest.mark.parametrize("compiled", [True, False])
def test_a_weight_used_by_two_layers_gets_the_sum_of_both_uses(compiled, monkeypatch):
    """Weight tying: the gradient is autograd's (the sum over both uses), the diagonal the sum of both estimates."""
    kernel, served = native.diagonal_walk, []

    def spy(*args, **kwargs):
        found = kernel(*args, **kwargs) if compiled else None
        served.append(found is not None)
        return found

    monkeypatch.setattr(native, "diagonal_walk", spy)
    torch.manual_seed(0)
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight
    model = extend(nn.Sequential(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(6, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(1, 6, dtype=torch.float64), torch.tensor([2])
    model.double()
    loss = loss_fn(model(x), y)
    found = loss_diagonals(loss, "hesscale", factored=True)
    assert served == [compiled]
    (expected,) = torch.autograd.grad(loss, [first.weight])
    torch.testing.assert_close(found.gradients[first.weight], expected, rtol=1e-12, atol=1e-15)
    written = loss_diagonals(loss, "hesscale").diagonals[first.weight]  # not factored: each use written out
    assert isinstance(written, torch.Tensor)
    torch.testing.assert_close(found.diagonals[first.weight], written, rtol=1e-12, atol=1e-15)


@needs_loops
def test_the_compiled_walk_finds_a_weight_registered_after_the_bias(monkeypatch):
    torch.manual_seed(0)
    last = nn.Linear(6, 3)
    weight = last.weight
    del last.weight
    last.weight = weight  # now after the bias in _parameters
    model = extend(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), last))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(1, 4), torch.tensor([1])
    compiled = loss_diagonals(loss_fn(model(x), y), "hesscale", factored=True)
    monkeypatch.setattr(native, "diagonal_walk", lambda *args, **kwargs: None)
    walked = loss_diagonals(loss_fn(model(x), y), "hesscale", factored=True)
    for p in model.parameters():
        torch.testing.assert_close(compiled.gradients[p], walked.gradients[p])


@needs_loops
def test_a_layer_without_outputs_leaves_the_next_layers_x2_right():
    g = torch.randn(3)
    steps = [
        native.WalkLinear(torch.randn(3, 0, requires_grad=True), torch.empty(1, 0)),
        native.WalkLinear(torch.randn(0, 4, requires_grad=True), torch.full((1, 4), 2.0)),
    ]
    found = native.diagonal_walk(g, g.abs(), 1.0, steps, True)
    assert found is not None
    assert torch.equal(found[1].x2, torch.full((4,), 4.0)) and found[1].grad.shape == (0, 4)


def _eager_walk(g, s, scale, steps, second):
    """``native.diagonal_walk`` op by op in torch: the LinearSums' (grad, g, s, x2) of each linear step."""
    g, s, found = scale * g.reshape(-1), scale * s.reshape(-1), []
    for i, step in enumerate(steps):
        if isinstance(step, native.WalkLinear):
            x = step.x.reshape(-1)
            found.append((torch.outer(g, x) if step.weight.requires_grad else None, g, s, x.square()))
            if i < len(steps) - 1:
                g, s = g @ step.weight, s @ step.weight.square()
            continue
        if isinstance(step, native.WalkActivation):
            y = step.y.reshape(-1)
            d1 = 1 - y.square() if step.name == "tanh" else y * (1 - y)
            d2 = -2 * y * d1 if step.name == "tanh" else d1 * (1 - 2 * y)
        else:
            d1, d2 = step.d1, step.d2
        s = s * d1 * d1 + (d2 * g if second else 0)
        g = g * d1
    return found


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("second", [True, False])
def test_the_compiled_walk_gives_the_eager_walk(dtype, second):
    """Steps of every kind, an activation above the first linear layer, odd sizes, a scale, a frozen weight."""
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(shape, generator=generator, dtype=dtype)  # noqa: E731
    steps = [
        native.WalkActivation("sigmoid", torch.rand(1, 37, generator=generator, dtype=dtype)),
        native.WalkLinear(rand(37, 29).requires_grad_(), rand(1, 29)),
        native.WalkActivation("tanh", rand(29).tanh()),
        native.WalkDerivatives(rand(29), rand(29)),
        native.WalkLinear(rand(29, 300), rand(300)),  # frozen: no gradient
        native.WalkLinear(rand(300, 3).requires_grad_(), rand(1, 3)),
    ]
    g, s = rand(1, 37), rand(1, 37).abs()
    found = native.diagonal_walk(g, s, 0.25, steps, second)
    expected = _eager_walk(g, s, 0.25, steps, second)
    assert found is not None and len(found) == len(expected) == 3
    for sums, values in zip(found, expected, strict=True):
        for a, b in zip(sums, values, strict=True):
            torch.testing.assert_close(a, b)


@needs_loops
def test_walks_the_compiled_loop_does_not_serve_get_none(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    big, x = torch.randn(native.PARALLEL_FROM // 256, 256), torch.randn(256)
    g = torch.randn(big.shape[0])
    assert native.diagonal_walk(g, g, 1.0, [native.WalkLinear(big, x)], True) is not None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # several threads: torch's parallel products
    assert native.diagonal_walk(g, g, 1.0, [native.WalkLinear(big, x)], True) is None
    assert native.diagonal_walk(g[:-1], g[:-1], 1.0, [native.WalkLinear(big[:-1], x)], True) is not None  # smaller
    small = [native.WalkLinear(big[:3], x)]
    assert native.diagonal_walk(g[:3], g[:3], 1.0, small, True) is not None
    assert native.diagonal_walk(g[:3].half(), g[:3].half(), 1.0, small, True) is None
    assert native.diagonal_walk(g[:3].to("meta"), g[:3].to("meta"), 1.0, small, True) is None


@needs_loops
def test_the_walk_of_other_modules_is_not_compiled(monkeypatch):
    monkeypatch.setattr(native, "diagonal_walk", lambda *args, **kwargs: pytest.fail("called"))
    model = extend(nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.0), nn.Tanh(), nn.Linear(6, 3)))
    loss_fn = extend(nn.CrossEntropyLoss())
    found = loss_diagonals(loss_fn(model(torch.randn(1, 4)), torch.tensor([1])), "hesscale", factored=True)
    assert len(found.diagonals) == 4


@needs_loops
def test_walk_steps_that_do_not_chain_are_value_errors():
    w, x, g = torch.randn(5, 4), torch.randn(4), torch.randn(5)
    with pytest.raises(ValueError, match="must chain"):
        native.diagonal_walk(g, g, 1.0, [native.WalkLinear(w, torch.randn(3))], True)  # x of another size
    with pytest.raises(ValueError, match="must chain"):
        native.diagonal_walk(g[:4], g[:4], 1.0, [native.WalkLinear(w, x)], True)  # g of another size
    with pytest.raises(ValueError, match="must chain"):
        native.diagonal_walk(g, g, 1.0, [native.WalkLinear(w, x), native.WalkDerivatives(x, x)], True)  # last
    with pytest.raises(ValueError, match="must chain"):
        steps = [native.WalkDerivatives(g, g[:4]), native.WalkLinear(w, x)]
        native.diagonal_walk(g, g, 1.0, steps, True)
    with pytest.raises(ValueError, match="one float dtype"):
        native.diagonal_walk(g, g, 1.0, [native.WalkLinear(w.double(), x.double())], True)


FORMS = [  # (gradient, trust, corrected): AdaHesScale, Scaled AdaHesScale and Scaled Adam (bias-corrected h or
    (False, False, True),  # not), Adam's preconditioner without the scaling
    (False, True, True),
    (False, True, False),
    (True, True, True),
    (True, True, False),
    (True, False, True),
]


@needs_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", FORMS)
# torch's lerp takes one form for a weight 1 - β1 below 0.5, another above
@pytest.mark.parametrize("beta1", [0.9, 0.3])
def test_the_update_passes_give_the_eager_update(dtype, form, beta1):
    """Parameters of 37 × 29 (rank-one d and written out: three blocks of 8 lanes and a tail of 5
    per row), 300, 3 and no entries, one call per pass, against ``optim._new_state`` and
    ``_check_sums``; the moves buffer is written up to the parameters' entries, not beyond."""
    generator = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.rand(shape, generator=generator, dtype=dtype)  # noqa: E731
    gradient, trust, corrected = form
    shapes = [(37, 29), (37, 29), (300,), (3,), (0,)]
    k = (1 - beta1, 0.999, 0.001, math.sqrt(1 - 0.999**2), 1e-8, -0.01 / (1 - beta1**2))
    params = [rand(*s) - 0.5 for s in shapes]
    moments = [(rand(*s) - 0.5, rand(*s) * 1e-3, rand(*s) * 1e-3 if gradient else None) for s in shapes]
    grads = [rand(*s) - 0.5 for s in shapes]
    diagonals = [(rand(37), rand(29)), rand(37, 29), rand(300) - 0.5, rand(3), rand(0)]
    updates = [native.Update(*args, k) for args in zip(params, moments, grads, diagonals, strict=True)]

    before = [
        (p.clone(), tuple(t if t is None else t.clone() for t in m)) for p, m in zip(params, moments, strict=True)
    ]
    written = [t for p, m in zip(params, moments, strict=True) for t in (p, *m) if t is not None]
    copies = [t.clone() for t in written]
    moves = torch.full((2 * 37 * 29 + 303 + 5,), 7.0, dtype=dtype)
    passes = native.UpdatePasses(updates, gradient, moves)
    sums = passes.sums(trust, corrected)
    assert torch.equal(moves[-5:], torch.full((5,), 7.0, dtype=dtype))
    assert all(torch.equal(t, c) for t, c in zip(written, copies, strict=True))  # the first pass writes none of them
    passes.apply(0.7)
    form_ = optim._Form(gradient, trust, corrected)
    rtol, eps = (1e-12, 2.3e-16) if dtype == torch.float64 else (1e-5, 1.2e-7)
    for (p0, (m0, v0, w0)), p, (m, v, w), g, d, found in zip(
        before, params, moments, grads, diagonals, sums, strict=True
    ):
        d = d[0].unsqueeze(1) * d[1].unsqueeze(0) if isinstance(d, tuple) else d
        new, move, h = optim._new_state(m0, v0, w0, g, d, k, form_, True)
        # the moments: the same operations (bit for bit where torch fuses multiply-adds as the loop does)
        torch.testing.assert_close(m, new["exp_avg"], rtol=2 * eps, atol=0)
        torch.testing.assert_close(v, new["exp_avg_sq"], rtol=2 * eps, atol=0)
        if gradient:
            torch.testing.assert_close(w, new["exp_avg_grad_sq"], rtol=2 * eps, atol=0)
        torch.testing.assert_close(p, p0 + 0.7 * move, rtol=rtol, atol=rtol)  # |p| < 1
        expected = [
            0.0 if h is None else float(h.double().sum()),
            float(new["exp_avg_grad_sq"].double().sum()) if gradient else 0.0,
        ]
        expected += [float(move.double().sum()), float(new["exp_avg_sq"].double().sum())]
        assert list(found[:2]) == pytest.approx(expected[:2], rel=rtol, abs=1e-300)
        if not trust:
            assert list(found[2:]) == pytest.approx(expected[2:], rel=rtol, abs=rtol * float(move.abs().sum()))


@needs_loops
def test_update_passes_refuse_tensors_that_do_not_fit():
    shape, k = (4, 3), (0.1, 0.999, 0.001, 0.05, 1e-8, -0.01)
    tensors = lambda dtype: [torch.zeros(shape, dtype=dtype) for _ in range(4)]  # noqa: E731
    p, m, v, g = tensors(torch.float64)
    moves = torch.empty(12, dtype=torch.float64)
    float32 = native.Update(p.float(), (m.float(), v.float(), None), g.float(), g.float(), k)
    with pytest.raises(ValueError, match="one float dtype"):  # a float32 parameter after a float64 one
        native.UpdatePasses(
            [native.Update(p, (m, v, None), g, g, k), float32], False, torch.empty(24, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="contiguous tensors of the parameter's entries"):
        native.UpdatePasses([native.Update(p, (m, v, None), g.T, g, k)], False, moves)
    with pytest.raises(ValueError, match="contiguous tensors of the parameter's entries"):  # w without gradient
        native.UpdatePasses([native.Update(p, (m, v, v), g, g, k)], False, moves)
    with pytest.raises(ValueError, match="contiguous tensors of the parameter's entries"):  # factors of 3 × 3
        native.UpdatePasses([native.Update(p, (m, v, None), g, (g[0], g[0]), k)], False, moves)
    with pytest.raises(ValueError, match="moves must be a contiguous buffer"):
        native.UpdatePasses([native.Update(p, (m, v, None), g, g, k)], False, moves[:11])
