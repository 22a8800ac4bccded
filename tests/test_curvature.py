"""Every curvature method against independent autograd references on small networks (float64)."""

import pytest
import reference
import torch
from cases import BATCH, LOSSES, MODELS, OUT, problem
from torch import nn

from hsbench import losses
from hsbench.curvature import METHODS, diagonal, diagonal_backprop, extend, loss_diagonals, modules, sampled_backprop
from hsbench.curvature.contracts import Elementwise, ParametrizedRule
from hsbench.curvature.loss_rules import loss_rule
from hsbench.curvature.modules import RULES, Selection
from hsbench.curvature.recording import tape_of
from hsbench.curvature.tape import record

CNNS = [m for m in MODELS if m.startswith("conv")]


def assert_close(found, expected, rtol=1e-9, atol=1e-12):
    assert found.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(found[k], expected[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


def max_difference(a, b, keys=None):
    return max(float((a[k] - b[k]).abs().max()) for k in (keys or b))


# ---------------------------------------------------------------------------------------------
# exact and ggn against autograd


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("loss_name", ["ce", "mse"])
def test_exact_and_ggn_on_every_network(model_name, loss_name):
    model, loss_fn, x, t = problem(model_name, loss_name)
    assert_close(diagonal("exact", model, loss_fn, x, t), reference.hessian_diagonal(model, loss_fn, x, t))
    assert_close(diagonal("ggn", model, loss_fn, x, t), reference.ggn_diagonal(model, loss_fn, x, t))


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_ggn_and_hesscale_last_layer_for_every_loss(loss_name, reduction):
    model, loss_fn, x, t = problem("mlp-tanh", loss_name, reduction)
    exact = reference.hessian_diagonal(model, loss_fn, x, t)
    assert_close(diagonal("exact", model, loss_fn, x, t), exact)
    assert_close(diagonal("ggn", model, loss_fn, x, t), reference.ggn_diagonal(model, loss_fn, x, t))
    last = [k for k in exact if k.startswith("4.") or k.startswith("0.4.")]  # the output Linear layer
    assert len(last) == 2
    output_activation = LOSSES[loss_name][2]  # a Softplus after the last layer: HesScaleGN drops its σ''
    for method in ("hesscale",) if output_activation else ("hesscale", "hesscale-gn"):
        found = diagonal(method, model, loss_fn, x, t)
        assert_close({k: found[k] for k in last}, {k: exact[k] for k in last})
        # hidden layers are approximations, except for the Gaussian entropy, linear in ν: with a zero
        # output Hessian HesScale drops no term in this network of two hidden layers
        if loss_name != "entropy-gauss":
            assert max_difference(found, exact) > 1e-6


def test_cnn_with_the_other_losses():
    for loss_name in ("gauss-log", "ppo-cat"):
        model, loss_fn, x, t = problem("conv2d", loss_name, "sum")
        assert_close(diagonal("exact", model, loss_fn, x, t), reference.hessian_diagonal(model, loss_fn, x, t))


def test_ppo_cases_include_clipped_and_unclipped_samples():
    model, loss_fn, x, t = problem("mlp-tanh", "ppo-cat")
    z = model(x).detach()
    g = loss_rule(loss_fn).grad(z, t)
    assert (g.abs().sum(1) == 0).any() and (g.abs().sum(1) > 0).any()


# ---------------------------------------------------------------------------------------------
# reinforcement-learning policies: GaussianHead, Exponential, Entropy


@pytest.mark.parametrize("loss_name", ["pg-gauss-log", "ppo-gauss", "gauss-log"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gaussian_head_log_std_diagonal_is_exact(loss_name, reduction):
    model, loss_fn, x, t = problem("gaussian-head", loss_name, reduction, seed=5)
    if loss_name == "ppo-gauss":  # clipped (zero gradient) and unclipped samples in the batch
        g = loss_rule(loss_fn).grad(model(x).detach(), t)
        assert (g.abs().sum(1) == 0).any() and (g.abs().sum(1) > 0).any()
    exact = reference.hessian_diagonal(model, loss_fn, x, t)
    assert_close(diagonal("exact", model, loss_fn, x, t), exact)
    assert exact["5.log_std"].abs().min() > 1e-3
    for method in ("hesscale", "hesscale-gn", "bl89", "ggn"):
        found = diagonal(method, model, loss_fn, x, t)["5.log_std"]
        torch.testing.assert_close(found, exact["5.log_std"], rtol=1e-9, atol=1e-12, msg=lambda m: f"{method}: {m}")
    # the mean network gets μ's half and follows the recursion
    assert_close(diagonal("hesscale", model, loss_fn, x, t), reference.hesscale_recursion(model, loss_fn, x, t))


def test_every_method_runs_on_a_gaussian_head_policy():
    model, loss_fn, x, t = problem("gaussian-head", "gauss-log")
    seed = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    found = {m: diagonal(m, model, loss_fn, x, t, mc_samples=3, generator=seed()) for m in METHODS}
    for m, values in found.items():
        assert list(values) == [k for k, _ in model.named_parameters()], m
        assert all(torch.isfinite(v).all() for v in values.values()), m
    params = reference.parameters(model)
    grad = torch.func.grad(lambda p: loss_fn(torch.func.functional_call(model, p, (x,)), t))(params)
    assert_close(found["grad2"], {k: v.square() for k, v in grad.items()})
    names = dict(model.named_parameters())
    with torch.no_grad():  # the gradients the optimizers take from the walks
        walked = [
            diagonal_backprop.backpropagate(record(model, loss_fn, x, t), "hesscale").gradients,
            sampled_backprop.backpropagate(record(model, loss_fn, x, t), "ggn-mc", 2, seed()).gradients,
        ]
    for gradients in walked:
        assert_close({k: gradients[p] for k, p in names.items()}, grad)
    assert_close({"5.log_std": found["kfac"]["5.log_std"]}, {"5.log_std": found["ggn-mc"]["5.log_std"]})
    # ggn-mc samples the Fisher of N(μ, e^ν): 1/2 per ν entry, 4 · 1/2 = 2 per log_std entry (mean reduction)
    many = diagonal("ggn-mc", model, loss_fn, x, t, mc_samples=40000, generator=seed())
    torch.testing.assert_close(many["5.log_std"], torch.full((2,), 2.0, dtype=torch.float64), rtol=0.05, atol=0)


def test_exponential_then_raw_variance_equals_log_variance_at_the_output():
    """A variance network ending in Exponential with variance="raw" losses (the authors' layout)
    passes the same gradient and exact diagonal to its pre-activation as variance="log" losses."""
    z = torch.randn(BATCH, OUT, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    nu = z[:, OUT // 2 :]
    raw_z = torch.cat([z[:, : OUT // 2], nu.exp()], 1)
    actions = torch.randn(BATCH, OUT // 2, dtype=torch.float64)
    advantages = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    for raw, log, target in [
        (losses.GaussianNLLLoss("raw"), losses.GaussianNLLLoss("log"), actions),
        (
            losses.PolicyGradientLoss("gaussian", "raw"),
            losses.PolicyGradientLoss("gaussian", "log"),
            (actions, advantages),
        ),
        (losses.Entropy("gaussian", "raw"), losses.Entropy("gaussian", "log"), None),
    ]:
        raw_rule, log_rule = loss_rule(raw), loss_rule(log)
        y = nu.exp()  # Exponential: σ' = σ'' = y
        g_raw, s_raw = raw_rule.grad(raw_z, target)[:, 2:], raw_rule.hessian_diagonal(raw_z, target)[:, 2:]
        torch.testing.assert_close(y * g_raw, log_rule.grad(z, target)[:, 2:])
        torch.testing.assert_close(y.square() * s_raw + y * g_raw, log_rule.hessian_diagonal(z, target)[:, 2:])


def test_entropy_without_target_per_sample_and_recorded():
    """Entropy is called as entropy(z): per-sample diagonals (vmap with no target) and the recorded
    forward pass of extended modules work with it."""
    model, loss_fn, x, t = problem("mlp-tanh", "entropy-cat")
    assert t is None
    for method in ("grad2", "hutchinson", "hesscale", "exact"):
        seed = lambda: torch.Generator().manual_seed(6)  # noqa: E731
        per_sample = diagonal(method, model, loss_fn, x, None, per_sample=True, mc_samples=2, generator=seed())
        alone = diagonal(method, model, loss_fn, x[1:2], None, mc_samples=2, generator=seed())
        assert_close({k: v[1] for k, v in per_sample.items()}, alone)
    extend(model), extend(loss_fn)
    loss = loss_fn(model(x))
    with torch.no_grad():
        found = diagonal_backprop.backpropagate(tape_of(loss, list(model.parameters()), "test"), "hesscale").diagonals
    assert_close({k: found[p] for k, p in model.named_parameters()}, diagonal("hesscale", model, loss_fn, x, None))


@pytest.mark.parametrize("loss_name", ["entropy-cat", "entropy-gauss", "entropy-gauss-raw"])
def test_entropy_rule_against_torch_func(loss_name):
    _, loss_fn, _, _ = problem("mlp-tanh", loss_name)
    z = torch.randn(BATCH, OUT, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z = z.exp() if loss_name.endswith("raw") else z
    rule = loss_rule(loss_fn)
    for n in range(BATCH):
        of_one = lambda u: loss_fn(u.unsqueeze(0))  # noqa: E731
        torch.testing.assert_close(rule.grad(z, None)[n], torch.func.grad(of_one)(z[n]))
        hessian = torch.func.hessian(of_one)(z[n])
        torch.testing.assert_close(rule.hessian_diagonal(z, None)[n], torch.diagonal(hessian))
        torch.testing.assert_close(rule.hessian(z, None)[n], hessian)
    if loss_name == "entropy-gauss":
        assert (rule.grad(z, None)[:, 2:] == 0.5).all() and (rule.hessian_diagonal(z, None) == 0).all()
    model, loss_fn, x, t = problem("mlp-tanh", loss_name)
    with pytest.raises(ValueError, match="no predictive distribution"):
        diagonal("ggn-mc", model, loss_fn, x, t)
    with pytest.raises(ValueError, match="Entropy takes no target"):
        loss_fn(z, torch.zeros(BATCH))


# ---------------------------------------------------------------------------------------------
# HesScale / HesScaleGN / BL89


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("variant", ["hesscale", "hesscale-gn"])
def test_hesscale_equals_brute_force_recursion(model_name, variant):
    model, loss_fn, x, t = problem(model_name, "ce", seed=3)
    expected = reference.hesscale_recursion(model, loss_fn, x, t, gauss_newton=variant == "hesscale-gn")
    assert_close(diagonal(variant, model, loss_fn, x, t), expected)


@pytest.mark.parametrize("loss_name", ["mse", "gauss-raw", "pg-gauss", "ppo-gauss", "ppo-cat"])
def test_hesscale_brute_force_with_other_losses(loss_name):
    model, loss_fn, x, t = problem("conv1d", loss_name, "sum", seed=4)
    assert_close(diagonal("hesscale", model, loss_fn, x, t), reference.hesscale_recursion(model, loss_fn, x, t))


def test_hesscale_with_dropout_in_training_mode():
    model, loss_fn, x, t = problem("conv2d-strided", "ce", train=True)
    torch.manual_seed(11)
    found = diagonal("hesscale", model, loss_fn, x, t)
    torch.manual_seed(11)
    masks = reference.dropout_masks(model, x)
    assert (masks[model[4]] == 0).any()
    assert_close(found, reference.hesscale_recursion(model, loss_fn, x, t, masks=masks))


def _loss_of_probabilities(loss_name, loss_fn, t, n):
    """Sample n's loss written as a function of the softmax probabilities q (C,)."""
    if loss_name in ("ce", "ce-soft"):
        p = t[n] if t.is_floating_point() else torch.nn.functional.one_hot(t[n], OUT).double()
        return lambda q: -(p * q.log()).sum()
    if loss_name == "pg-cat":
        return lambda q: -t[1][n] * q[t[0][n]].log()
    if loss_name == "entropy-cat":
        return lambda q: -(q * q.log()).sum()
    actions, advantages, old = (u[n] for u in t)
    ratio = lambda q: q[actions] / old.exp()  # noqa: E731
    return lambda q: (
        -torch.minimum(ratio(q) * advantages, ratio(q).clamp(1 - loss_fn.clip, 1 + loss_fn.clip) * advantages)
    )


@pytest.mark.parametrize("loss_name", ["ce", "ce-soft", "pg-cat", "ppo-cat", "entropy-cat"])
def test_bl89_output_diagonal_follows_its_definition(loss_name):
    model, loss_fn, x, t = problem("mlp-tanh", loss_name)
    z = model(x).detach()
    found = loss_rule(loss_fn).bl89_diagonal(z, t)
    for n in range(z.shape[0]):
        expected = reference.softmax_bl89_start(_loss_of_probabilities(loss_name, loss_fn, t, n), z[n])
        torch.testing.assert_close(found[n], expected)


def test_bl89_is_hesscale_for_mse_and_differs_from_exact_at_the_softmax():
    model, loss_fn, x, t = problem("mlp-tanh", "mse")
    assert_close(diagonal("bl89", model, loss_fn, x, t), diagonal("hesscale", model, loss_fn, x, t))
    model, loss_fn, x, t = problem("mlp-tanh", "ce")
    bl89, exact = diagonal("bl89", model, loss_fn, x, t), diagonal("exact", model, loss_fn, x, t)
    assert max_difference(bl89, exact, ["4.weight", "4.bias"]) > 1e-3
    start = lambda n, z: loss_rule(loss_fn).bl89_diagonal(z.unsqueeze(0), t[n : n + 1])[0]  # noqa: E731
    assert_close(bl89, reference.hesscale_recursion(model, loss_fn, x, t, start=start))


def test_hesscale_is_exact_for_width_one_hidden_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1), nn.Tanh(), nn.Linear(1, 1), nn.Sigmoid(), nn.Linear(1, 1)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    assert_close(diagonal("hesscale", model, nn.MSELoss(), x, y), reference.hessian_diagonal(model, nn.MSELoss(), x, y))


def test_hesscale_is_exact_for_square_diagonal_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.ELU(), nn.Linear(3, 3)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    assert (
        max_difference(diagonal("hesscale", model, loss_fn, x, y), reference.hessian_diagonal(model, loss_fn, x, y))
        > 1e-4
    )
    with torch.no_grad():
        for layer in model[::2]:
            layer.weight.copy_(torch.diag(torch.diagonal(layer.weight)))
    assert_close(diagonal("hesscale", model, loss_fn, x, y), reference.hessian_diagonal(model, loss_fn, x, y))


def test_hesscale_gn_equals_hesscale_for_relu_networks_only():
    for activation, equal in (("relu", True), ("tanh", False)):
        model, loss_fn, x, t = problem(f"mlp-{activation}", "ce")
        gap = max_difference(diagonal("hesscale-gn", model, loss_fn, x, t), diagonal("hesscale", model, loss_fn, x, t))
        assert (gap < 1e-15) if equal else (gap > 1e-4)


# ---------------------------------------------------------------------------------------------
# Monte-Carlo estimators: converge within a tolerance derived from the sample count


def _single_draw_spread(method, model, loss_fn, x, t, draws=300):
    """Per-entry standard deviation of the one-sample estimator, from ``draws`` seeds."""
    runs = [diagonal(method, model, loss_fn, x, t, generator=torch.Generator().manual_seed(s)) for s in range(draws)]
    return {k: torch.stack([r[k] for r in runs]).std(0) for k in runs[0]}


@pytest.mark.parametrize(
    "method,target,model_name,loss_name",
    [
        ("hutchinson", "exact", "mlp-tanh", "ce"),
        ("hutchinson", "exact", "conv1d", "mse"),
        ("hutchinson", "exact", "mlp-elu", "gauss-log"),
        ("ggn-mc", "ggn", "mlp-tanh", "ce"),
        ("ggn-mc", "ggn", "conv1d", "mse"),  # for the Gaussian NLL ggn-mc samples the Fisher: see below
    ],
)
def test_monte_carlo_estimators_converge(method, target, model_name, loss_name):
    model, loss_fn, x, t = problem(model_name, loss_name)
    samples = 20000
    spread = _single_draw_spread(method, model, loss_fn, x, t)
    found = diagonal(method, model, loss_fn, x, t, mc_samples=samples, generator=torch.Generator().manual_seed(999))
    expected = diagonal(target, model, loss_fn, x, t)
    for k in expected:
        tolerance = 5 * spread[k] / samples**0.5 + 1e-12
        assert ((found[k] - expected[k]).abs() <= tolerance).all(), k
    few = diagonal(method, model, loss_fn, x, t, mc_samples=1, generator=torch.Generator().manual_seed(0))
    assert max_difference(few, expected) > max_difference(found, expected)


def test_ggn_mc_for_gaussian_nll_samples_the_fisher():
    model, loss_fn, x, t = problem("mlp-tanh", "gauss-log")
    z = model(x).detach()
    _, var = losses.gaussian_split(z, "log")

    # Fisher of N(μ, e^ν) in (μ, ν): diag(1/σ², 1/2) per dimension, so Jᵀ F J from the reference GGN
    # of a loss whose output Hessian is that Fisher: 0.5 Σ (μ - c)²/σ² + 0.25 Σ (ν - d)² at fixed σ².
    def fisher_loss(out, _):
        return (0.5 * ((out[:, :2] ** 2) / var).sum() + 0.25 * (out[:, 2:] ** 2).sum()) / out.shape[0]

    expected = reference.ggn_diagonal(model, fisher_loss, x, t)
    found = diagonal("ggn-mc", model, loss_fn, x, t, mc_samples=20000, generator=torch.Generator().manual_seed(1))
    spread = _single_draw_spread("ggn-mc", model, loss_fn, x, t)
    for k in expected:
        assert ((found[k] - expected[k]).abs() <= 5 * spread[k] / 20000**0.5 + 1e-12).all(), k


def test_kfac_equals_ggn_mc_for_one_sample_of_an_mlp():
    model, loss_fn, x, t = problem("mlp-tanh", "ce")
    x, t = x[:1], t[:1]
    for samples in (1, 7):
        kfac = diagonal("kfac", model, loss_fn, x, t, mc_samples=samples, generator=torch.Generator().manual_seed(3))
        ggnmc = diagonal("ggn-mc", model, loss_fn, x, t, mc_samples=samples, generator=torch.Generator().manual_seed(3))
        assert_close(kfac, ggnmc)


def test_kfac_per_sample_equals_ggn_mc_per_sample_for_an_mlp():
    """One sample's own KFAC factors of a Linear layer multiply to its GGN-MC diagonal (same draws)."""
    model, loss_fn, x, t = problem("mlp-tanh", "ce")
    for samples in (1, 5):
        seed = lambda: torch.Generator().manual_seed(8)  # noqa: E731
        kfac = diagonal("kfac", model, loss_fn, x, t, per_sample=True, mc_samples=samples, generator=seed())
        ggnmc = diagonal("ggn-mc", model, loss_fn, x, t, per_sample=True, mc_samples=samples, generator=seed())
        assert_close(kfac, ggnmc)


def test_kfac_converges_to_the_kronecker_product_of_exact_factors():
    """With many samples, B_n → mean_t diag(GGN_n w.r.t. the layer output) for each sample n, with
    A_n = Σ_t u uᵀ from its input patches; per sample the result is diag(B_n) ⊗ diag(A_n), for the
    batch (mean reduction) mean_n B_n ⊗ mean_n A_n. Checked on a CNN, factors from autograd."""
    model, loss_fn, x, t = problem("conv1d", "ce")
    conv = model[0]
    n = x.shape[0]
    rest = model[1:]
    y = conv(x).detach()
    b = []
    for i in range(n):
        j = torch.func.jacrev(lambda u: rest(u.unsqueeze(0))[0])(y[i]).reshape(OUT, -1)
        h = torch.func.hessian(lambda z: loss_fn(z.unsqueeze(0), t[i : i + 1]))(model(x[i : i + 1])[0].detach())
        b.append(torch.diagonal(j.T @ h @ j).reshape(y.shape[1], -1).mean(1))
    b = torch.stack(b)  # (N, C_out)
    patches = torch.nn.functional.unfold(
        torch.nn.functional.pad(x, (1, 1)).unsqueeze(2), (1, 3), stride=(1, 2)
    )  # (N, C_in * 3, T)
    a = patches.square().sum(-1).reshape(n, 2, 3)  # (N, C_in, k); conv has 2 groups of one input channel
    groups = torch.arange(4) // 2
    positions = patches.shape[-1]
    expected_weight = b[:, :, None, None] * a[:, groups].reshape(n, 4, 1, 3)
    seed = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    per_sample = diagonal("kfac", model, loss_fn, x, t, per_sample=True, mc_samples=40000, generator=seed())
    torch.testing.assert_close(per_sample["0.weight"], expected_weight, rtol=0.05, atol=1e-6)
    torch.testing.assert_close(per_sample["0.bias"], b * positions, rtol=0.05, atol=1e-6)
    batch = diagonal("kfac", model, loss_fn, x, t, mc_samples=40000, generator=seed())
    expected_batch = b.mean(0)[:, None, None] * a.mean(0)[groups].reshape(4, 1, 3)  # mean reduction: scale·N = 1
    torch.testing.assert_close(batch["0.weight"], expected_batch, rtol=0.05, atol=1e-6)
    torch.testing.assert_close(batch["0.bias"], b.mean(0) * positions, rtol=0.05, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# per-sample diagonals


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name,loss_name", [("conv2d", "ce"), ("gaussian-head", "gauss-log")])
def test_per_sample_mean_and_single_sample_runs(method, model_name, loss_name):
    model, loss_fn, x, t = problem(model_name, loss_name)
    seed = lambda: torch.Generator().manual_seed(21)  # noqa: E731
    per_sample = diagonal(method, model, loss_fn, x, t, per_sample=True, mc_samples=3, generator=seed())
    batch = diagonal(method, model, loss_fn, x, t, mc_samples=3, generator=seed())
    assert all(v.shape == (x.shape[0], *batch[k].shape) for k, v in per_sample.items())
    mean = {k: v.mean(0) for k, v in per_sample.items()}
    if method in ("grad2", "kfac"):  # products of batch statistics: the mean is not the batch result
        assert max_difference(mean, batch) > 1e-6
    else:
        assert_close(mean, batch)
    if method in ("ggn-mc", "kfac"):
        return  # their draws depend on the batch size
    for n in range(x.shape[0]):
        alone = diagonal(method, model, loss_fn, x[n : n + 1], t[n : n + 1], mc_samples=3, generator=seed())
        assert_close({k: v[n] for k, v in per_sample.items()}, alone)


def test_per_sample_with_sum_reduction_sums_to_the_batch():
    model, loss_fn, x, t = problem("mlp-tanh", "mse", "sum")
    per_sample = diagonal("hesscale", model, loss_fn, x, t, per_sample=True)
    assert_close({k: v.sum(0) for k, v in per_sample.items()}, diagonal("hesscale", model, loss_fn, x, t))


# ---------------------------------------------------------------------------------------------
# interface, errors, dtypes


def test_unknown_method_lists_the_valid_ones():
    model, loss_fn, x, t = problem()
    with pytest.raises(ValueError, match=r"hesscale-gn.*bl89"):
        diagonal("hesscale2", model, loss_fn, x, t)


def test_unsupported_module_is_named_with_its_position():
    model = nn.Sequential(nn.Linear(5, 4), nn.Sequential(nn.Tanh(), nn.BatchNorm1d(4)), nn.Linear(4, 2))
    x, y = torch.randn(3, 5), torch.randint(0, 2, (3,))
    for method in ("hesscale", "exact", "ggn-mc", "kfac"):
        with pytest.raises(ValueError, match=r"BatchNorm1d at position '1\.1'"):
            diagonal(method, model, nn.CrossEntropyLoss(), x, y)
    model.eval()  # autograd-only methods take any model
    assert diagonal("grad2", model, nn.CrossEntropyLoss(), x, y)["1.1.weight"].shape == (4,)


def test_a_rule_missing_a_method_of_its_contract_fails_when_registered():
    written = ("vjp", "vjp_squared", "pullback", "squared_pullback", "gradient", "squared_gradients")
    # a parametrized layer rule that forgets kfac and hessian_diagonals
    Incomplete = type("Incomplete", (ParametrizedRule,), {name: lambda self, *args: None for name in written})
    missing = r"Incomplete cannot be registered.*hessian_diagonals \(required by ParametrizedRule\), kfac"
    with pytest.raises(TypeError, match=missing):
        {nn.Linear: Incomplete()}

    class NoDerivatives(Elementwise):
        pass

    with pytest.raises(TypeError, match=r"derivatives \(required by Elementwise\)"):
        NoDerivatives()


def test_a_module_with_parameters_needs_a_parametrized_rule():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return x * self.weight

    RULES[Scale] = Selection()  # a parameter-free rule for a module that has parameters
    try:
        model = nn.Sequential(nn.Linear(5, 4), Scale())
        with pytest.raises(ValueError, match=r"Scale at position '1' has parameters.*ParametrizedRule"):
            diagonal("hesscale", model, nn.MSELoss(), torch.randn(3, 5), torch.randn(3, 4))
    finally:
        del RULES[Scale]


def test_unsupported_loss_and_policy_losses_without_sampling():
    model, _, x, t = problem()
    with pytest.raises(ValueError, match="loss L1Loss is not supported"):
        diagonal("hesscale", model, nn.L1Loss(), x, torch.zeros(3, OUT, dtype=torch.float64))
    model, loss_fn, x, t = problem("mlp-tanh", "pg-cat")
    with pytest.raises(ValueError, match="no predictive distribution"):
        diagonal("ggn-mc", model, loss_fn, x, t)


def test_in_place_activations_work():
    torch.manual_seed(0)

    def layers(inplace):
        return [nn.Linear(5, 4), nn.ReLU(inplace), nn.Linear(4, 4), nn.ELU(inplace=inplace), nn.Linear(4, 3)]

    plain = nn.Sequential(*layers(False)).double()
    inplace = nn.Sequential(*layers(True)).double()
    inplace.load_state_dict(plain.state_dict())
    x, y = torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 2, 1])
    for method in ("hesscale", "exact"):
        assert_close(
            diagonal(method, inplace, nn.CrossEntropyLoss(), x, y), diagonal(method, plain, nn.CrossEntropyLoss(), x, y)
        )


def test_float32_agrees_with_float64():
    model, loss_fn, x, t = problem("conv2d", "ce")
    expected = diagonal("hesscale", model, loss_fn, x, t)
    found = diagonal("hesscale", model.float(), loss_fn, x.float(), t)
    assert all(v.dtype == torch.float32 for v in found.values())
    assert_close(found, {k: v.float() for k, v in expected.items()}, rtol=1e-4, atol=1e-6)


def test_results_are_detached_and_shaped_like_parameters():
    model, loss_fn, x, t = problem("conv3d", "ce")
    for method in METHODS:
        found = diagonal(method, model, loss_fn, x, t)
        assert list(found) == [k for k, _ in model.named_parameters()]
        assert all(
            v.shape == p.shape and not v.requires_grad for v, p in zip(found.values(), model.parameters(), strict=True)
        )


@pytest.mark.parametrize("reduction, per_sample", [("mean", False), ("sum", False), ("sum", True)])
def test_the_walks_of_one_recording_compute_each_loss_derivative_once(reduction, per_sample, monkeypatch):
    from hsbench.curvature.estimators import ESTIMATORS, Batch, hutchinson_sets
    from hsbench.curvature.loss_rules import CrossEntropy

    calls: dict[str, int] = {}
    for name in ("grad", "hessian_diagonal", "bl89_diagonal", "hessian"):
        original = getattr(CrossEntropy, name)

        def counted(self, z, target, name=name, original=original):
            calls[name] = calls.get(name, 0) + 1
            return original(self, z, target)

        monkeypatch.setattr(CrossEntropy, name, counted)
    activation = modules.Activation.derivatives

    def counted_activation(self, module, ctx):
        calls["activation"] = calls.get("activation", 0) + 1
        return activation(self, module, ctx)

    monkeypatch.setattr(modules.Activation, "derivatives", counted_activation)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1])
    batch = Batch(model, nn.CrossEntropyLoss(reduction=reduction), x, y)
    methods = ("exact", "ggn", "hesscale", "hesscale-gn", "bl89", "ggn-mc", "kfac")
    shared = {m: ESTIMATORS[m](batch, 2, torch.Generator(), per_sample) for m in methods}
    if not per_sample:  # the recorded-walk Hutchinson (per sample: autograd)
        hutchinson_sets(batch, [1, 2], torch.Generator(), per_sample)
    names = ("grad", "hessian_diagonal", "bl89_diagonal", "hessian")
    assert calls == dict.fromkeys((*names, "activation"), 1)  # and the tanh's (σ', σ'') once
    stored = dict(zip(names, batch.tape().loss_derivatives(*names), strict=True))
    again = Batch(model, nn.CrossEntropyLoss(reduction=reduction), x, y).tape()
    for name, value in stored.items():  # no walk changed the shared values in place
        assert torch.equal(value, getattr(again.loss, name)(again.output, again.target)), name
    shared_tape = batch.tape()
    for kept, fresh in zip(
        shared_tape.activation_derivatives(shared_tape.steps[1]),
        again.activation_derivatives(again.steps[1]),
        strict=True,
    ):
        assert torch.equal(kept, fresh)
    for m in methods:  # each alone on a fresh recording (draws from a fresh generator, as above): the same numbers
        alone = ESTIMATORS[m](
            Batch(model, nn.CrossEntropyLoss(reduction=reduction), x, y), 2, torch.Generator(), per_sample
        )
        assert all(torch.equal(alone[k], shared[m][k]) for k in alone), m


@pytest.mark.parametrize("conv", [False, True])
def test_walks_without_gradients_give_the_same_diagonals_and_no_gradients(conv):
    torch.manual_seed(0)
    if conv:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ELU(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3)).double()
        x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3)).double()
        x = torch.randn(4, 4, dtype=torch.float64)
    tape = record(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2, 1, 2]))
    with torch.no_grad():  # as their callers run the walks
        for per_sample in (False, True):
            for variant in diagonal_backprop.VARIANTS:
                full = diagonal_backprop.backpropagate(tape, variant, per_sample)
                bare = diagonal_backprop.backpropagate(tape, variant, per_sample, gradients=False)
                assert bare.gradients == {} and len(full.gradients) == len(full.diagonals) == 4
                assert all(torch.equal(bare.diagonals[p], d) for p, d in full.diagonals.items())
            for method in ("ggn-mc", "kfac"):
                full = sampled_backprop.backpropagate(tape, method, 3, torch.Generator().manual_seed(1), per_sample)
                bare = sampled_backprop.backpropagate(
                    tape, method, 3, torch.Generator().manual_seed(1), per_sample, gradients=False
                )
                assert bare.gradients == {} and len(full.gradients) == 4
                assert all(torch.equal(bare.diagonals[p], d) for p, d in full.diagonals.items())


def test_a_module_used_at_two_positions_is_refused():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Linear is used at positions '0' and '2'"):
        extend(model)
    with pytest.raises(ValueError, match=r"Linear is used at positions '0' and '2'"):
        diagonal("hesscale", model, nn.CrossEntropyLoss(), torch.randn(3, 4), torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("targets", ["indices", "probabilities"])
@pytest.mark.parametrize("diagonal", ["hessian_diagonal", "bl89_diagonal"])
def test_cross_entropy_derivatives_together_equal_each_alone(dtype, targets, diagonal):
    """``grad_and_diagonal`` (the diagonal walks ask for the gradient and one diagonal at once;
    for class indices it skips the one-hot targets) gives ``grad`` and the diagonal bit for bit,
    and BL89's diagonal is p ∘ q ∘ (1 − q) with the one-hot p bit for bit."""
    from hsbench.curvature.loss_rules import CrossEntropy

    torch.manual_seed(0)
    rule, z = CrossEntropy(nn.CrossEntropyLoss()), 3 * torch.randn(6, 5, dtype=dtype)
    t = torch.tensor([0, 4, 2, 2, 1, 3]) if targets == "indices" else torch.softmax(torch.randn(6, 5, dtype=dtype), 1)
    g, d = rule.grad_and_diagonal(z, t, diagonal)
    assert torch.equal(g, rule.grad(z, t)) and torch.equal(d, getattr(rule, diagonal)(z, t))
    q, p = torch.softmax(z, 1), t if targets == "probabilities" else nn.functional.one_hot(t, 5).to(dtype)
    assert torch.equal(rule.bl89_diagonal(z, t), p * q * (1 - q))
    if targets == "indices":
        with pytest.raises(ValueError, match="ignore_index"):
            rule.grad_and_diagonal(z, torch.tensor([0, -100, 2, 2, 1, 3]), diagonal)
        ignoring_4 = CrossEntropy(nn.CrossEntropyLoss(ignore_index=4))  # an ignored class inside [0, C)
        with pytest.raises(ValueError, match="ignore_index"):
            ignoring_4.grad_and_diagonal(z, t, diagonal)  # t's largest class is 4
        ignoring_4.grad_and_diagonal(z, torch.tensor([0, 2, 3, 3, 1, 3]), diagonal)  # none of them 4: fine
        ignoring_3 = CrossEntropy(nn.CrossEntropyLoss(ignore_index=3))
        ignoring_3.grad_and_diagonal(z, torch.tensor([0, 4, 2, 2, 1, 0]), diagonal)  # 3 between them, not among them
        as_bytes = rule.grad_and_diagonal(z, t.to(torch.uint8), diagonal)  # torch's loss takes uint8 classes too
        assert torch.equal(as_bytes[0], g) and torch.equal(as_bytes[1], d)
        for method in (rule.hessian, rule.hessian_diagonal, rule.bl89_diagonal):  # checked whether read or not
            with pytest.raises(ValueError, match=r"must lie in \[0, 5\); got 0 to 5"):
                method(z, torch.tensor([0, 5, 2, 2, 1, 3]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_batch_gradient_is_autograds(reduction):
    """``Batch.gradient`` (figure 2's SGD step, from the recording the estimates share) is the
    gradient of the batch loss."""
    from hsbench.curvature import Batch, batch_diagonals

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.ELU(), nn.Linear(3, 2)).double()
    x, y, loss_fn = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 1, 0, 1]), nn.CrossEntropyLoss()
    loss_fn.reduction = reduction
    batch = Batch(model, loss_fn, x, y, gradient_along=True)
    estimates = batch_diagonals(batch, {"h": ("hesscale", 1)})  # its walk computes the gradient along
    expected = torch.autograd.grad(loss_fn(model(x), y), list(model.parameters()))
    for found in (batch.gradient(), Batch(model, loss_fn, x, y).gradient()):  # along, or a walk of its own
        assert list(found) == [name for name, _ in model.named_parameters()]
        for (name, _), g in zip(model.named_parameters(), expected, strict=True):
            torch.testing.assert_close(found[name], g, rtol=1e-12, atol=1e-15)
    alone = diagonal("hesscale", model, loss_fn, x, y)
    assert all(torch.equal(estimates["h"][name], alone[name]) for name in alone)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("n", [1, 5])
def test_linear_kfac_is_the_weighted_maps_bit_for_bit(per_sample, n):
    """Linear's own ``kfac`` (one input position) gives the numbers of the general rule for
    convolutions and linear maps, ``WeightedMap.kfac``."""
    torch.manual_seed(0)
    layer, rule = nn.Linear(4, 3).double(), RULES[nn.Linear]
    x = torch.randn(n, 4, dtype=torch.float64)
    ctx = rule.context(layer, x, layer(x))
    v = torch.randn(n, 6, 3, dtype=torch.float64)
    own, general = rule.kfac(layer, ctx, v, per_sample), modules.WeightedMap.kfac(rule, layer, ctx, v, per_sample)
    assert own.keys() == general.keys() == {"weight", "bias"}
    assert all(torch.equal(own[k], general[k]) for k in own)


def test_cross_entropy_mc_factor_for_class_indices_is_the_one_hot_probabilities():
    """The Monte-Carlo factor for class-index targets (one-hot without ``one_hot``, mass 1) equals,
    bit for bit and with the same draws, the factor for the same targets given as probabilities."""
    from hsbench.curvature.loss_rules import CrossEntropy

    torch.manual_seed(0)
    rule, z, t = CrossEntropy(nn.CrossEntropyLoss()), torch.randn(4, 5, dtype=torch.float64), torch.tensor([1, 0, 4, 4])
    factors = [
        rule.mc_factor(z, target, 7, torch.Generator().manual_seed(3))
        for target in (t, nn.functional.one_hot(t, 5).double())
    ]
    assert torch.equal(*factors) and factors[0].shape == (4, 7, 5)


def test_an_optimizers_recording_keeps_no_activation_derivatives():
    """A recording that the optimizers walk once computes σ', σ'' per walk and keeps none: kept,
    they would hold activation-sized tensors as long as the loss's graph (only a ``Batch``'s
    recording, walked by several estimators, keeps them)."""
    torch.manual_seed(0)
    model, loss_fn = extend(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))), extend(nn.CrossEntropyLoss())
    loss = loss_fn(model(torch.randn(5, 4)), torch.tensor([0, 1, 1, 0, 1]))
    loss_diagonals(loss, "hesscale")
    tape = tape_of(loss, list(model.parameters()), "test")
    assert not tape.shared and not tape._activations


def test_an_extended_model_saved_and_loaded_whole_still_records():
    """``torch.save`` of a whole extended model (pickle) keeps its recording hooks: the loaded
    copy's curvature is the original's, including a module whose rule configured it (MaxPool)."""
    import io

    torch.manual_seed(0)
    model = extend(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 4), nn.Tanh(),
                      nn.Linear(4, 3))
    )  # fmt: skip
    loss_fn = extend(nn.CrossEntropyLoss())
    saved = io.BytesIO()
    torch.save((model, loss_fn), saved)
    saved.seek(0)
    loaded, loaded_loss_fn = torch.load(saved, weights_only=False)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 2, 1, 1, 0])
    for method in ("hesscale", "exact"):
        ours = loss_diagonals(loss_fn(model(x), y), method).diagonals
        theirs = loss_diagonals(loaded_loss_fn(loaded(x), y), method).diagonals
        assert len(theirs) == 6
        for p, q in zip(model.parameters(), loaded.parameters(), strict=True):
            assert torch.equal(ours[p], theirs[q]) and bool(ours[p].abs().sum() > 0)
