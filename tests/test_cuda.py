"""On a CUDA device every estimator and optimizer computes what it computes on the CPU.

Skipped where torch sees no CUDA device (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py`` (issue 14; the last run is cited in docs/figure8.md). Everything
is float64, so CPU and CUDA differ by rounding only (different reduction orders and kernels).
"""

import copy

import pytest
import torch
from cases import problem
from torch import nn

from hsbench import optim
from hsbench.curvature import diagonal, extend, loss_diagonals
from hsbench.curvature.modules import RankOne
from hsbench.experiments.update_time import UpdateTime
from hsbench.optim import OPTIMIZERS, make, train_step

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

DETERMINISTIC = ("exact", "ggn", "hesscale", "hesscale-gn", "bl89")  # the others draw on the device's generator


def to(value, device):
    """``value`` (a tensor, or a tuple of tensors such as a policy loss's target) on ``device``."""
    if isinstance(value, tuple):
        return tuple(to(v, device) for v in value)
    return value.to(device)


def assert_same(found: dict, expected: dict) -> None:
    assert list(found) == list(expected)
    for key, value in found.items():
        assert value.is_cuda
        torch.testing.assert_close(value.cpu(), expected[key], rtol=1e-10, atol=1e-13)


CASES = [(m, loss) for m in ("mlp-tanh", "conv2d", "conv1d", "conv3d") for loss in ("ce", "mse")]


@pytest.mark.parametrize("model_name, loss_name", [*CASES, ("gaussian-head", "ppo-gauss")])
def test_diagonals_on_cuda_equal_the_cpus(model_name, loss_name):
    model, loss_fn, x, t = problem(model_name, loss_name)
    expected = {m: diagonal(m, model, loss_fn, x, t) for m in DETERMINISTIC}
    model.cuda()
    for method in DETERMINISTIC:
        assert_same(diagonal(method, model, loss_fn, x.cuda(), to(t, "cuda")), expected[method])


@pytest.mark.parametrize("variant", ["hesscale", "hesscale-gn", "bl89"])
def test_factored_diagonals_on_cuda_equal_the_cpus(variant):
    """Batch size 1: the linear weights' diagonals as rank-one factors, as the optimizers take them."""
    model, loss_fn, x, t = problem("mlp-tanh", "ce")
    x, t = x[:1], t[:1]
    found = {}
    for device in ("cpu", "cuda"):
        net, fn = extend(copy.deepcopy(model).to(device)), extend(copy.deepcopy(loss_fn))
        backward = loss_diagonals(fn(net(x.to(device)), t.to(device)), variant, factored=True)
        found[device] = {
            name: (backward.gradients[p], _written(backward.diagonals[p])) for name, p in net.named_parameters()
        }
    for name, (grad, diag) in found["cuda"].items():
        torch.testing.assert_close(grad.cpu(), found["cpu"][name][0], rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(diag.cpu(), found["cpu"][name][1], rtol=1e-10, atol=1e-13)


def _written(d):
    assert isinstance(d, RankOne) or d.dim() == 1  # the weights' diagonals come as factors
    return d.materialize() if isinstance(d, RankOne) else d


@pytest.fixture
def cpu_draws(monkeypatch):
    """AdaHessian's probes and the Monte-Carlo GGN's samples drawn on the CPU's generator and moved
    to the device, so that a CPU run and a CUDA run see the same draws."""
    randint_like, multinomial = torch.randint_like, torch.multinomial
    monkeypatch.setattr(torch, "randint_like", lambda p, high: randint_like(p.cpu(), high).to(p.device))
    monkeypatch.setattr(
        torch, "multinomial", lambda q, n, **kw: multinomial(q.cpu(), n, **kw).to(q.device)
    )  # fmt: skip


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("batch", [1, 4])  # 1: the linear weights' diagonals are rank-one factors
@pytest.mark.parametrize("compiled", [False, True])  # True: every parameter takes the compiled step
def test_optimizers_on_cuda_step_as_on_the_cpu(name, batch, compiled, cpu_draws, monkeypatch):
    monkeypatch.setattr(optim._CompiledUpdate, "MIN_SIZE", 0 if compiled else 1 << 62)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x, y = torch.randn(batch, 6, dtype=torch.float64), torch.tensor([0, 3, 1, 2])[:batch]
    hyper = {"lr": 0.05} | ({"trust_region": 1e-4} if name.startswith("scaled") else {})
    found = {}
    for device in ("cpu", "cuda"):
        net = copy.deepcopy(model).to(device)
        loss_fn = nn.CrossEntropyLoss()
        if OPTIMIZERS[name].needs_recording:
            net, loss_fn = extend(net), extend(loss_fn)
        opt = make(name, net.parameters(), **hyper)
        torch.manual_seed(1)
        for _ in range(4):
            train_step(opt, net, loss_fn, x.to(device), y.to(device))
        found[device] = (net, opt)
    (cpu, cpu_opt), (cuda, cuda_opt) = found["cpu"], found["cuda"]
    for p, q in zip(cpu.parameters(), cuda.parameters(), strict=True):
        assert q.is_cuda
        torch.testing.assert_close(q.cpu(), p, rtol=1e-10, atol=1e-13)
        for key, value in cpu_opt.state[p].items():
            torch.testing.assert_close(torch.as_tensor(cuda_opt.state[q][key]).cpu(), torch.as_tensor(value))
    if name.startswith("scaled"):
        assert cuda_opt.last_scale == pytest.approx(cpu_opt.last_scale, rel=1e-10)


def test_update_time_runs_on_cuda():
    """Figure 8's kind on a CUDA device (smoke scale): every optimizer timed on every network."""
    settings = {"panel": "b", "max_outputs": 16, "max_depth": 2, "batch_size": 1, "updates": 3, "warmup": 1}
    settings |= {"threads": 1, "clock": "wall"}
    ctx = type("Ctx", (), {"device": "cuda", "seed": 0})()
    metrics = UpdateTime().run(settings, ctx)
    assert metrics["sizes"] == [1, 2]
    assert metrics["gpu"] == torch.cuda.get_device_name()  # named in the table's caption
    for name in OPTIMIZERS:
        assert all(0 < t < 10 for times in metrics[f"times_s/{name}"] for t in times)
