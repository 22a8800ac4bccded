"""Hutchinson's estimate from the walk of the recorded forward pass (``hutchinson_backprop``) equals
the one from autograd's Hessian-vector products (torch.func, reverse over reverse) for the same
probes, to float rounding; several probe sets in one pass equal successive calls."""

import pytest
import torch
from torch import nn

from hsbench.curvature import autograd_estimators, hutchinson_backprop
from hsbench.experiments.networks import mlp

CASES = [  # inputs, width, depth, classes, activation, batch, loss
    (12, 6, 2, 4, "tanh", 1, nn.CrossEntropyLoss()),
    (6, 5, 3, 3, "elu", 4, nn.CrossEntropyLoss()),
    (5, 4, 2, 3, "sigmoid", 3, nn.CrossEntropyLoss(reduction="sum")),
    (5, 4, 1, 2, "relu", 2, nn.MSELoss()),
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[4]}-N{c[5]}" for c in CASES])
def test_walk_equals_autograd_for_the_same_probes(case, monkeypatch):
    inputs, width, depth, classes, activation, n, loss_fn = case
    torch.manual_seed(0)
    model = mlp(inputs, width, depth, classes, activation).double()
    x = torch.randn(n, inputs, dtype=torch.float64)
    y = torch.randn(n, classes, dtype=torch.float64) if isinstance(loss_fn, nn.MSELoss) else torch.randint(0, 3, (n,))
    tape = autograd_estimators._tape_or_none(model, loss_fn, x, y)
    assert tape is not None and hutchinson_backprop.supported(tape)

    def sets(use_walk: bool) -> list[dict[str, torch.Tensor]]:
        with monkeypatch.context() as patch:
            if not use_walk:
                patch.setattr(hutchinson_backprop, "supported", lambda tape: False)
            return autograd_estimators.hutchinson_sets(model, loss_fn, x, y, [1, 7], torch.Generator().manual_seed(3))

    walk, autograd = sets(True), sets(False)
    generator = torch.Generator().manual_seed(3)
    successive = [autograd_estimators.hutchinson(model, loss_fn, x, y, m, generator) for m in (1, 7)]
    for found, reference, one_by_one in zip(walk, autograd, successive, strict=True):
        assert found.keys() == reference.keys() == dict(model.named_parameters()).keys()
        for name, value in found.items():
            scale = float(reference[name].abs().max())
            assert scale > 1e-6  # every parameter's estimate is non-trivial here
            torch.testing.assert_close(value, reference[name], rtol=0, atol=1e-13 * scale)
            torch.testing.assert_close(one_by_one[name], value, rtol=0, atol=1e-13 * scale)


def test_networks_the_walk_does_not_know_go_through_autograd(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double()
    x, y = torch.randn(2, 1, 10, dtype=torch.float64), torch.tensor([0, 2])
    loss_fn = nn.CrossEntropyLoss()
    tape = autograd_estimators._tape_or_none(model, loss_fn, x, y)
    assert tape is not None and not hutchinson_backprop.supported(tape)
    monkeypatch.setattr(hutchinson_backprop, "backpropagate", lambda *args: pytest.fail("the walk was used"))
    found = autograd_estimators.hutchinson(model, loss_fn, x, y, 3, torch.Generator().manual_seed(0))

    # reference: the same probes, each Hessian-vector product by torch.autograd.functional.hvp
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    probes = autograd_estimators.rademacher(dict(zip(names, params, strict=True)), 3, torch.Generator().manual_seed(0))

    def loss(*values):
        return loss_fn(torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x,)), y)

    products = [
        torch.autograd.functional.hvp(loss, params, tuple(probes[name][m] for name in names))[1] for m in range(3)
    ]
    assert found.keys() == set(names)
    for i, name in enumerate(names):
        reference = torch.stack([probes[name][m] * products[m][i] for m in range(3)]).mean(0)
        torch.testing.assert_close(found[name], reference, rtol=1e-12, atol=1e-14)
