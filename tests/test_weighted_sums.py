"""Weighted sums of recorded losses: Σ c_k · L_k in the curvature methods and the optimizers."""

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from hsbench.curvature import METHODS, diagonal, extend, loss_diagonals
from hsbench.losses import Entropy, PolicyGradientLoss
from hsbench.optim import make

COEFFICIENTS = [(-0.7, 2.5), (0.0, 1.0), (0.25, -3.0)]


def actor_critic(seed=0):
    """A categorical actor (4 actions) and a critic on 3 inputs, extended, float64, and a batch."""
    torch.manual_seed(seed)
    actor = extend(nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).double())
    critic = extend(nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double())
    x = torch.randn(7, 3, dtype=torch.float64)
    pg_target = (torch.randint(0, 4, (7,)), torch.randn(7, dtype=torch.float64))  # actions, advantages
    returns = torch.randn(7, 1, dtype=torch.float64)
    return actor, critic, x, pg_target, returns


def terms(networks: int, seed=0, sampling=False):
    """(the two terms as (network, loss module, target), the batch): one network, a policy-gradient
    loss and an entropy on the same output; or two networks, the policy-gradient loss and a critic's
    MSE. ``sampling``: losses with a predictive distribution (Monte-Carlo methods), cross-entropy
    instead of the policy gradient and an MSE instead of the entropy."""
    actor, critic, x, pg_target, returns = actor_critic(seed)
    if sampling:
        first = (actor, extend(nn.CrossEntropyLoss()), pg_target[0])
    else:
        first = (actor, extend(PolicyGradientLoss()), pg_target)
    if networks == 2:
        return [first, (critic, extend(nn.MSELoss()), returns)], x
    if sampling:
        second = (actor, extend(nn.MSELoss()), torch.randn(7, 4, dtype=torch.float64))
    else:
        second = (actor, extend(Entropy()), None)
    return [first, second], x


def recorded(term, x, z=None):
    net, loss_fn, target = term
    z = net(x) if z is None else z
    return loss_fn(z) if target is None else loss_fn(z, target)


def by_tensor(net, found: dict) -> dict:
    params = dict(net.named_parameters())
    return {params[name]: value for name, value in found.items()}


def combine(parts: list[tuple[float, dict]]) -> dict:
    total = {}
    for c, values in parts:
        for p, v in values.items():
            total[p] = total[p] + c * v if p in total else c * v
    return total


def assert_same(found: dict, expected: dict):
    assert set(map(id, found)) == set(map(id, expected))
    for p, value in expected.items():
        torch.testing.assert_close(found[p], value, rtol=1e-9, atol=1e-12)


# hutchinson on two networks is left out: its probes are drawn per parameter in order, so the
# critic's drawn alone differ from those drawn after the actor's
CASES = [(m, n) for m in METHODS if m != "grad2" for n in (1, 2) if (m, n) != ("hutchinson", 2)]


@pytest.mark.parametrize("a,b", COEFFICIENTS)
@pytest.mark.parametrize("method,networks", CASES)
def test_diagonal_of_a_weighted_sum_is_the_weighted_sum_of_the_diagonals(method, networks, a, b):
    (t1, t2), x = terms(networks, sampling=method in ("ggn-mc", "kfac"))
    z = t1[0](x)
    shared = z if networks == 1 else None
    loss = a * recorded(t1, x, z) + b * recorded(t2, x, shared)
    found = loss_diagonals(loss, method, mc_samples=3, generator=torch.Generator().manual_seed(1))

    # separately, through the per-model entry point (its own recording), draws continuing in order
    gen = torch.Generator().manual_seed(1)
    parts = []
    for c, (net, loss_fn, target) in ((a, t1), (b, t2)):
        if method == "hutchinson":
            gen = torch.Generator().manual_seed(1)  # the same probes for every term
        parts.append((c, by_tensor(net, diagonal(method, net, loss_fn, x, target, mc_samples=3, generator=gen))))
    assert_same(found.diagonals, combine(parts))
    params = list(found.gradients)
    assert_same(found.gradients, dict(zip(params, torch.autograd.grad(loss, params, retain_graph=True), strict=True)))


@pytest.mark.parametrize("networks", [1, 2])
def test_exact_diagonal_of_a_weighted_sum_equals_torch_func(networks):
    """Against an independent reference: the diagonal of the Hessian of the whole expression."""
    (t1, t2), x = terms(networks)
    nets = list({id(t[0]): t[0] for t in (t1, t2)}.values())
    params = [p for net in nets for p in net.parameters()]
    sizes = [p.numel() for p in params]

    def expression(theta):
        chunks = iter(torch.split(theta, sizes))
        values = [{k: next(chunks).reshape(p.shape) for k, p in net.named_parameters()} for net in nets]
        outputs = {id(net): torch.func.functional_call(net, v, (x,)) for net, v in zip(nets, values, strict=True)}
        first = t1[1](outputs[id(t1[0])], t1[2])
        second = t2[1](outputs[id(t2[0])]) if t2[2] is None else t2[1](outputs[id(t2[0])], t2[2])
        return -0.7 * first + 2.5 * second

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    exact = torch.diagonal(torch.func.hessian(expression)(flat)).split(sizes)
    z = t1[0](x)
    loss = -0.7 * recorded(t1, x, z) + 2.5 * recorded(t2, x, z if networks == 1 else None)
    found = loss_diagonals(loss, "exact")
    for p, d in zip(params, exact, strict=True):
        torch.testing.assert_close(found.diagonals[p], d.reshape(p.shape), rtol=1e-9, atol=1e-12)


def test_grad2_is_the_square_of_the_weighted_sums_gradient():
    (t1, t2), x = terms(2)
    loss = 0.5 * recorded(t1, x) - 2.0 * recorded(t2, x)
    found = loss_diagonals(loss, "grad2")
    params = list(found.diagonals)
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    assert_same(found.diagonals, {p: g.square() for p, g in zip(params, grads, strict=True)})


def test_constants_signs_and_repeated_terms():
    """−L/4 + L + 3 = 0.75 L (+ a constant, which has no derivatives); 0.5 * mse alone; pg − 0.01 · entropy."""
    (t1, t2), x = terms(2)
    l1, l2 = recorded(t1, x), recorded(t2, x)
    d1, d2 = loss_diagonals(l1, "hesscale").diagonals, loss_diagonals(l2, "hesscale").diagonals
    assert_same(loss_diagonals(l1 - 0.3 * l2, "hesscale").diagonals, combine([(1.0, d1), (-0.3, d2)]))
    assert_same(loss_diagonals(2 * l1 - l2 - l2, "hesscale").diagonals, combine([(2.0, d1), (-2.0, d2)]))
    (pg, entropy), x = terms(1)
    z = pg[0](x)
    loss = recorded(pg, x, z) - 0.01 * recorded(entropy, x, z)
    expected = combine(
        [
            (1.0, loss_diagonals(recorded(pg, x, z), "exact").diagonals),
            (-0.01, loss_diagonals(recorded(entropy, x, z), "exact").diagonals),
        ]
    )
    assert_same(loss_diagonals(loss, "exact").diagonals, expected)
    assert_same(loss_diagonals(-l1 / 4 + l1 + 3, "hesscale").diagonals, combine([(0.75, d1)]))
    assert_same(loss_diagonals(0.5 * l2, "exact").diagonals, combine([(0.5, loss_diagonals(l2, "exact").diagonals)]))


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda l1, l2, plain: l1 * l2, "product or quotient of two losses"),
        (lambda l1, l2, plain: l1 / l2, "product or quotient of two losses"),
        (lambda l1, l2, plain: l1.exp() + l2, "ExpBackward0"),
        (lambda l1, l2, plain: l1 + 0.5 * plain, "MseLossBackward0"),
        (lambda l1, l2, plain: l1 * torch.ones(2, dtype=torch.float64), r"shape \(2,\)"),
        (lambda l1, l2, plain: l1.detach(), "without autograd graph"),
    ],
)
def test_unsupported_expressions_name_what_is_wrong(build, message):
    (t1, t2), x = terms(2)
    plain = nn.MSELoss()(t2[0](x), t2[2])  # a loss module that is not extended
    loss = build(recorded(t1, x), recorded(t2, x), plain)
    with pytest.raises(RuntimeError, match=message):
        loss_diagonals(loss, "hesscale")
    opt = make("adahesscale", [p for t in (t1, t2) for p in t[0].parameters()])
    with pytest.raises(RuntimeError, match=message):
        opt.backward(loss)


def test_parameters_of_a_network_without_a_term_are_reported():
    (t1, t2), x = terms(2)
    opt = make("adahesscale", [*t1[0].parameters(), *t2[0].parameters()])
    with pytest.raises(RuntimeError, match=r"AdaHesScale: 4 parameter\(s\) .* not reached"):
        opt.backward(recorded(t1, x))  # the critic's parameters get nothing


@pytest.mark.parametrize("name", ["adahesscale", "adahesscale-gn", "adabl89", "adahessian", "adam", "sgd"])
def test_one_optimizer_over_actor_and_critic_equals_one_per_network(name):
    (t1, t2), x = terms(2)
    actor, critic = t1[0], t2[0]
    twin_actor, twin_critic = copy.deepcopy(actor), copy.deepcopy(critic)
    together = make(name, [*actor.parameters(), *critic.parameters()], lr=0.01)
    apart = [make(name, twin_actor.parameters(), lr=0.01), make(name, twin_critic.parameters(), lr=0.01)]
    for step in range(3):
        torch.manual_seed(step)  # AdaHessian's probes: drawn per parameter, actor first in both
        together.zero_grad()
        loss = recorded(t1, x) + 0.5 * recorded(t2, x)
        together.backward(loss)
        together.step()
        torch.manual_seed(step)
        twins = ((twin_actor, t1[1], t1[2]), (twin_critic, t2[1], t2[2]))
        for opt, (net, loss_fn, target), c in zip(apart, twins, (1, 0.5), strict=True):
            opt.zero_grad()
            opt.backward(c * loss_fn(net(x), target))
            opt.step()
    together_params = [*actor.parameters(), *critic.parameters()]
    for p, q in zip(together_params, [*twin_actor.parameters(), *twin_critic.parameters()], strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert not torch.equal(actor[0].weight, actor_critic()[0][0].weight)  # the steps moved it


def test_losses_sharing_an_output_leave_no_reference_cycle():
    """Once the losses are gone the recorded activations are freed at once, without the garbage collector."""
    (pg, entropy), x = terms(1)
    gc.disable()
    try:
        z = pg[0](x)
        output = weakref.ref(z)
        loss = recorded(pg, x, z) - 0.01 * recorded(entropy, x, z)
        loss_diagonals(loss, "hesscale")
        del z, loss
        assert output() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("networks,walks", [(1, 1), (2, 2)])
def test_terms_on_one_output_share_one_backward_walk(networks, walks, monkeypatch):
    from hsbench.curvature import diagonal_backprop

    calls = []
    walk = diagonal_backprop.backpropagate
    monkeypatch.setattr(diagonal_backprop, "backpropagate", lambda *args: calls.append(args) or walk(*args))
    (t1, t2), x = terms(networks)
    z = t1[0](x)
    loss_diagonals(recorded(t1, x, z) - 0.01 * recorded(t2, x, z if networks == 1 else None), "hesscale")
    assert len(calls) == walks
