"""Independent reference implementations for the curvature tests, written with plain autograd.

Nothing here uses hsbench.curvature: Hessians, Jacobians and second derivatives all come from
torch.func / torch.autograd on the model as a black box (or on one module at a time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils._pytree import tree_map


def parameters(model):
    return {k: v.detach() for k, v in model.named_parameters()}


def hessian_diagonal(model, loss_fn, x, t):
    """Diagonal of the full parameter Hessian of the batch loss."""
    params = parameters(model)
    h = hessian(lambda p: loss_fn(functional_call(model, p, (x,)), t))(params)
    return {k: torch.diagonal(h[k][k].reshape(v.numel(), v.numel())).reshape(v.shape) for k, v in params.items()}


def ggn_diagonal(model, loss_fn, x, t):
    """diag(Jᵀ H J) with J the Jacobian of the whole batch output and H the batch loss Hessian w.r.t. it."""
    params = parameters(model)
    out = model(x).detach()
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    h = hessian(lambda z: loss_fn(z, t))(out).reshape(out.numel(), out.numel())
    result = {}
    for k, v in params.items():
        j = jac[k].reshape(out.numel(), v.numel())
        result[k] = torch.einsum("ap,ab,bp->p", j, h, j).reshape(v.shape)
    return result


def loss_of_one(loss_fn, t, n):
    """ℓ_n as a function of sample n's output z_n (a batch of one)."""
    t_n = tree_map(lambda u: u[n : n + 1], t)
    return lambda z: loss_fn(z.unsqueeze(0), t_n)


def leaves(model):
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in leaves(child)]
    return [model]


def dropout_masks(model, x):
    """Replays the masks the curvature core draws for Dropout in training mode (one draw per module
    in forward order, ``F.dropout`` of ones); call right after seeding the RNG the same way."""
    masks = {}
    with torch.no_grad():
        for leaf in leaves(model):
            if isinstance(leaf, nn.Dropout) and leaf.training:
                masks[leaf] = F.dropout(torch.ones_like(x), leaf.p, True)
                x = x * masks[leaf]
            else:
                x = leaf(x)
    return masks


def softmax_bl89_start(loss_of_probabilities, z):
    """BL89's output diagonal by its definition, for one sample's logits z (C,): the loss as a
    function of the probabilities q, its gradient and Hessian diagonal in q, pushed through the
    diagonal of the softmax Jacobian and of its second derivatives."""
    q = torch.softmax(z, 0)
    lq = torch.func.grad(loss_of_probabilities)(q)
    lqq = torch.diagonal(hessian(loss_of_probabilities)(q))
    jac = torch.diagonal(jacrev(lambda u: torch.softmax(u, 0))(z))
    second = torch.stack([torch.diagonal(hessian(lambda u: torch.softmax(u, 0)[i])(z))[i] for i in range(z.numel())])
    return jac.square() * lqq + second * lq


def hesscale_recursion(model, loss_fn, x, t, gauss_newton=False, start=None, masks=None):
    """HesScale by brute force: per sample and module, the module's Jacobians w.r.t. its input and
    parameters come from autograd; only their squared entries (and, unless ``gauss_newton``, the
    second-derivative term Σ_o g_o ∂²y_o/∂x_i²) are used. ``start(n, z_n)`` gives the output diagonal
    (default: the exact loss Hessian diagonal)."""
    masks = masks or {}
    mods = leaves(model)
    batch = x.shape[0]
    scale = 1.0 / batch if loss_fn.reduction == "mean" else 1.0
    total = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    names = {id(p): k for k, p in model.named_parameters()}

    def apply(module, inp, params=None):
        if module in masks:
            return inp * masks[module][n : n + 1]
        return functional_call(module, params, (inp,)) if params is not None else module(inp)

    for n in range(batch):
        inputs, h = [], x[n : n + 1]
        for m in mods:
            inputs.append(h)
            h = apply(m, h).detach()
        loss = loss_of_one(loss_fn, t, n)
        z = h[0]
        g = torch.func.grad(loss)(z).reshape(h.shape)
        s = torch.diagonal(hessian(loss)(z).reshape(z.numel(), z.numel())) if start is None else start(n, z)
        s = s.reshape(h.shape)
        for m, inp in zip(reversed(mods), reversed(inputs), strict=True):
            own = {k: p.detach() for k, p in m.named_parameters(recurse=False)}
            for k, p in own.items():
                jp = jacrev(lambda q: apply(m, inp, {**own, k: q}))(p).reshape(s.numel(), p.numel())
                total[names[id(getattr(m, k))]] += scale * (jp.square().T @ s.reshape(-1)).reshape(p.shape)
            jx = jacrev(lambda u: apply(m, u))(inp).reshape(s.numel(), inp.numel())
            s_in = jx.square().T @ s.reshape(-1)
            if not gauss_newton:
                s_in = s_in + torch.diagonal(hessian(lambda u: (g * apply(m, u)).sum())(inp).reshape(inp.numel(), -1))
            g = (jx.T @ g.reshape(-1)).reshape(inp.shape)
            s = s_in.reshape(inp.shape)
    return total
