"""The compiled updates of larger parameters (torch.compile's ``hsbench.optim._CompiledUpdate``, the
C loop's ``_NativeUpdate``) against the eager one."""

import copy
import math

import pytest
import torch
from torch import nn

from hsbench import optim
from hsbench.curvature import extend, loss_diagonals, native
from hsbench.curvature.modules import RankOne
from hsbench.optim import Diverged, make, train_step

FORMS = {  # name, hyperparameters
    "adahesscale": {},
    "adahesscale-gn": {"weight_decay": 0.01},
    "scaled-adahesscale": {"trust_region": 1e-4},
    "scaled-adahesscale uncorrected": {"trust_region": 1e-4, "trust_region_bias_correction": False},
    "scaled-adam": {"trust_region": 1e-4},
}


def problem(dtype=torch.float64, batch=3):
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype))
    x, y = torch.randn(batch, 6, dtype=dtype), torch.tensor([0, 3, 1])[:batch]
    return model, extend(nn.CrossEntropyLoss()), x, y


ENGINES = {"compiled": optim._CompiledUpdate, "native": native.UpdatePasses}
needs_loops = pytest.mark.skipif(not native.available(torch.float64), reason="no C compiler: the loops are off")
engines = pytest.mark.parametrize("engine", ["compiled", pytest.param("native", marks=needs_loops)])


APPLIES = optim._NativeUpdate.applies


def fused_everywhere(monkeypatch, engine: str | None, min_size: int = 0) -> None:
    """Parameters of ``min_size`` entries or more take ``engine``'s update, the others the eager
    one, joined (``optim._Batch``); ``engine`` None: every parameter the eager one."""
    monkeypatch.setattr(optim._CompiledUpdate, "MIN_SIZE", min_size if engine == "compiled" else 1 << 62)
    native_from = min_size if engine == "native" else 1 << 62
    monkeypatch.setattr(
        optim._NativeUpdate, "applies", lambda s, item: item.param.numel() >= native_from and APPLIES(s, item)
    )


@engines
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("batch", [1, 3])  # 1: linear weights' diagonals as factors (RankOne)
@pytest.mark.parametrize("min_size", [0, 20])  # 20: the weights compiled, the biases joined (optim._Batch)
def test_compiled_update_equals_the_eager_one(engine, form, batch, min_size, monkeypatch):
    name, hyper = form.split()[0], {"lr": 0.05, **FORMS[form]}
    model, loss_fn, x, y = problem(batch=batch)
    twin = copy.deepcopy(model)
    results = []
    for on, net in ((None, model), (engine, twin)):
        fused_everywhere(monkeypatch, on, min_size)
        calls = []
        monkeypatch.setattr(ENGINES[engine], "apply", _spy(ENGINES[engine].apply, calls))
        opt = make(name, net.parameters(), **hyper)
        scales = []
        for _ in range(4):
            train_step(opt, net, loss_fn, x, y)
            scales.append(opt.last_scale)
        assert len(calls) == (4 if on else 0)
        results.append((net, opt, scales))
    (eager, eager_opt, eager_scales), (fused, fused_opt, fused_scales) = results
    assert fused_scales == pytest.approx(eager_scales, rel=1e-12)
    if "trust_region" in hyper:
        assert min(eager_scales) < 1  # the scaling is exercised
    for p, q in zip(eager.parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-15)
        for key, value in eager_opt.state[p].items():
            expected = fused_opt.state[q][key]
            assert (key == "step" and value == expected) or torch.allclose(expected, value, rtol=1e-12, atol=1e-20)


def _spy(method, calls):
    def spied(self, *args, **kwargs):
        calls.append(1)
        return method(self, *args, **kwargs)

    return spied


@engines
@pytest.mark.parametrize("name", ["adahesscale", "scaled-adam"])
@pytest.mark.parametrize("min_size", [0, 20])
def test_compiled_update_changes_nothing_on_divergence(engine, name, min_size, monkeypatch):
    fused_everywhere(monkeypatch, engine, min_size)
    calls = []
    monkeypatch.setattr(ENGINES[engine], "sums", _spy(ENGINES[engine].sums, calls))
    model, loss_fn, x, y = problem(torch.float32)
    opt = make(name, model.parameters(), lr=0.01)
    train_step(opt, model, loss_fn, x, y)
    params, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    opt.backward(loss_fn(model(x), y))
    model[0].weight.grad[1, 2] = math.inf
    with pytest.raises(Diverged, match="not finite"):
        opt.step()
    opt.zero_grad()
    opt.backward(1e25 * loss_fn(model(x), y))  # finite gradients, an overflowing second moment
    with pytest.raises(Diverged, match="not finite"):
        opt.step()
    if name == "scaled-adam":  # only Adam's second moment w overflows (h's term and the move stay finite)
        opt.zero_grad()
        opt.backward(loss_fn(model(x), y))
        model[0].weight.grad[1, 2] = 1e30
        with pytest.raises(Diverged, match="not finite"):
            opt.step()
    assert len(calls) == (4 if name == "scaled-adam" else 3)  # every step went through the engine's sums
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), params.values(), strict=True))
    for p, entries in opt.state_dict()["state"].items():
        for key, value in entries.items():
            saved = state["state"][p][key]
            assert torch.equal(value, saved) if isinstance(value, torch.Tensor) else value == saved


@pytest.mark.parametrize("variant", ["hesscale", "hesscale-gn", "bl89"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factored_diagonals_are_the_diagonals(variant, dtype):
    """At batch size one, linear weights' diagonals come as factors whose product is, bit for bit,
    the diagonal written out; everything else is unchanged."""
    model, loss_fn, x, y = problem(dtype, batch=1)
    written = loss_diagonals(loss_fn(model(x), y), variant)
    factored = loss_diagonals(loss_fn(model(x), y), variant, factored=True)
    for p in model.parameters():
        d = factored.diagonals[p]
        assert isinstance(d, RankOne) == (p.dim() == 2)
        assert torch.equal(d.materialize() if isinstance(d, RankOne) else d, written.diagonals[p])
        assert torch.equal(factored.gradients[p], written.gradients[p])


@needs_loops
@pytest.mark.parametrize("threads", [1, 2])
def test_the_c_loop_takes_large_parameters_only_with_one_thread(threads, monkeypatch):
    """The C loop is single-threaded: with several threads, parameters of ``MIN_SIZE`` entries or
    more take the compiled loops, which run in parallel."""
    monkeypatch.setattr(optim._CompiledUpdate, "MIN_SIZE", 20)  # the weights (30 and 20 entries) large, the biases not
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    served = {"compiled": [], "native": []}
    compiled_apply, passes = optim._CompiledUpdate.apply, native.UpdatePasses.__init__

    def spy_compiled(self, items, *args):
        served["compiled"] += [item.param.numel() for item in items]
        return compiled_apply(self, items, *args)

    def spy_native(self, updates, *args):
        served["native"] += [u.param.numel() for u in updates]
        return passes(self, updates, *args)

    monkeypatch.setattr(optim._CompiledUpdate, "apply", spy_compiled)
    monkeypatch.setattr(native.UpdatePasses, "__init__", spy_native)
    model, loss_fn, x, y = problem()
    train_step(make("adahesscale", model.parameters()), model, loss_fn, x, y)
    if threads == 1:
        assert served == {"compiled": [], "native": [30, 5, 20, 4]}
    else:
        assert served == {"compiled": [30, 20], "native": [5, 4]}


@pytest.mark.parametrize("engine", [None, "compiled", pytest.param("native", marks=needs_loops)])
def test_a_step_advances_the_version_counters_of_the_parameters(engine, monkeypatch):
    """As with torch's optimizers, a graph that saved the weights before a step cannot be
    backpropagated after it: autograd sees the parameters written (the C loop writes raw memory)."""
    fused_everywhere(monkeypatch, engine)
    model, loss_fn, x, y = problem()
    opt = make("adahesscale", model.parameters(), lr=0.01)
    train_step(opt, model, loss_fn, x, y)
    loss = loss_fn(model(x), y)
    train_step(opt, model, loss_fn, x, y)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("engine", [None, pytest.param("native", marks=needs_loops)])
def test_a_parameter_without_entries_is_stepped_with_the_others(engine, monkeypatch):
    fused_everywhere(monkeypatch, engine)
    a, empty = nn.Parameter(torch.tensor([1.0, -2.0, 0.5])), nn.Parameter(torch.zeros(0))
    opt = make("adahessian", [a, empty], lr=0.1)
    opt.zero_grad()
    opt.backward((a**4).sum() + (empty**2).sum())
    opt.step()
    start = torch.tensor([1.0, -2.0, 0.5])  # first step: g / (|z Hz| + eps), g = 4a³, Hz = 12a² z, z = ±1
    expected = start - 0.1 * 4 * start**3 / (12 * start**2 + 1e-4)
    torch.testing.assert_close(a.detach(), expected, rtol=1e-6, atol=0)
    assert empty.shape == (0,) and opt.state[empty]["step"] == 1
