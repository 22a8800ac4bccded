"""The compiled one-pass pullbacks of a linear layer (``hsbench.curvature.fused_pullbacks``)."""

import pytest
import torch
from torch import nn

from hsbench.curvature import extend, fused_pullbacks, loss_diagonals
from hsbench.curvature.modules import RankOne


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """Compile into an empty cache folder, forgetting any library loaded before."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fused_pullbacks._library.cache_clear()
    yield tmp_path / "hsbench"
    fused_pullbacks._library.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(512, 64), (100, 513), (256, 257)])
def test_the_kernel_gives_the_eager_products(dtype, shape, fresh_library):
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=generator, dtype=dtype)
    g, s = torch.randn(2, shape[0], generator=generator, dtype=dtype)
    found = fused_pullbacks.pullbacks(w, g, s)
    assert found is not None
    assert [p.name for p in fresh_library.iterdir()] == [p.name for p in fresh_library.glob("fused_pullbacks-*.so")]
    torch.testing.assert_close(found[0], g @ w)
    torch.testing.assert_close(found[1], s @ w.square())


def test_tensors_the_kernel_does_not_serve_get_none(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    big = torch.randn(fused_pullbacks.PARALLEL_FROM // 256, 256)
    g, s = torch.randn(2, big.shape[0])
    assert fused_pullbacks.pullbacks(big, g, s) is not None
    small = torch.randn(fused_pullbacks.SERVES_FROM // 128 - 1, 128)
    assert fused_pullbacks.pullbacks(small, g[: len(small)], s[: len(small)]) is None
    assert fused_pullbacks.pullbacks(big.T.contiguous().T, g, s) is None  # strided
    assert fused_pullbacks.pullbacks(big.half(), g.half(), s.half()) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # several threads: torch's parallel products
    assert fused_pullbacks.pullbacks(big, g, s) is None
    assert fused_pullbacks.pullbacks(big[:-1], g[:-1], s[:-1]) is not None  # below PARALLEL_FROM


def test_without_a_compiler_the_products_are_eager_with_a_warning(monkeypatch, fresh_library):
    monkeypatch.setenv("CC", str(fresh_library / "no-such-compiler"))
    w, g, s = torch.randn(256, 256), torch.randn(256), torch.randn(256)
    with pytest.warns(UserWarning, match="fused pullbacks unavailable, computed eagerly"):
        assert fused_pullbacks.pullbacks(w, g, s) is None
    monkeypatch.delenv("CC")
    fused_pullbacks._library.cache_clear()
    monkeypatch.setenv("HSBENCH_NATIVE", "0")
    assert fused_pullbacks.pullbacks(w, g, s) is None


@pytest.mark.parametrize("variant", ["hesscale", "hesscale-gn", "bl89"])
def test_the_walk_with_the_kernel_equals_the_walk_without(variant, monkeypatch):
    """Batch size one, factored diagonals (as the optimizers take them): a network whose middle
    layer is large enough for the kernel."""
    torch.manual_seed(0)
    model = extend(nn.Sequential(nn.Linear(8, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 5)))
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(1, 8), torch.tensor([3])
    served = []
    kernel = fused_pullbacks.pullbacks

    def spy(*args):
        result = kernel(*args)
        served.append(result is not None)
        return result

    monkeypatch.setattr(fused_pullbacks, "pullbacks", spy)
    found = loss_diagonals(loss_fn(model(x), y), variant, factored=True)
    assert served == [False, True]  # output layer (too small), middle layer; the first needs no input part
    monkeypatch.setattr(fused_pullbacks, "pullbacks", lambda *args: None)
    eager = loss_diagonals(loss_fn(model(x), y), variant, factored=True)
    for p, d in found.diagonals.items():
        e = eager.diagonals[p]
        assert isinstance(d, RankOne) == isinstance(e, RankOne) == (p.dim() == 2)
        torch.testing.assert_close(d.materialize() if p.dim() == 2 else d, e.materialize() if p.dim() == 2 else e)
        torch.testing.assert_close(found.gradients[p], eager.gradients[p])
