"""Estimators that need only autograd, so they work for any differentiable model and loss:
the squared gradient g² and Hutchinson's z ∘ (H z) (Yao et al. 2021, AdaHessian)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from torch.utils._pytree import tree_map


def _parameters(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def _loss(model: nn.Module, loss_fn):
    buffers = dict(model.named_buffers())

    def loss(params, x, t):
        return loss_fn(functional_call(model, {**params, **buffers}, (x,)), t)

    return loss


def _target_dim(targets) -> int | None:
    """vmap's in_dim of the targets: None for a loss without target (``hsbench.losses.Entropy``)."""
    return None if targets is None else 0


def _of_one(loss):
    """The loss of one sample as a batch of one: ℓ_n, for vmap over samples."""

    def of_one(params, x, t):
        return loss(params, x.unsqueeze(0), None if t is None else tree_map(lambda u: u.unsqueeze(0), t))

    return of_one


def squared_gradient(model, loss_fn, inputs, targets, per_sample: bool = False) -> dict[str, Tensor]:
    """(∂L/∂θ)² of the batch loss, or (∂ℓ_n/∂θ)² per sample."""
    loss, params = _loss(model, loss_fn), _parameters(model)
    if per_sample:
        per_sample_grad = vmap(grad(_of_one(loss)), in_dims=(None, 0, _target_dim(targets)), randomness="different")
        g = per_sample_grad(params, inputs, targets)
    else:
        g = grad(loss)(params, inputs, targets)
    return {k: v.square() for k, v in g.items()}


def rademacher(params: dict[str, Tensor], samples: int, generator=None) -> dict[str, Tensor]:
    """``samples`` Rademacher vectors (±1 entries) per parameter, shape (samples, *parameter);
    each entry is one bit of a random byte (several times faster than one integer per entry)."""
    probes = {}
    for k, p in params.items():
        n = samples * p.numel()
        random_bytes = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=generator, device=p.device)
        bits = (random_bytes.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=p.device)) & 1
        probes[k] = bits.view(torch.int8).flatten()[:n].mul(2).sub_(1).to(p.dtype).reshape(samples, *p.shape)
    return probes


def hutchinson(model, loss_fn, inputs, targets, samples: int, generator=None, per_sample: bool = False):
    """mean over ``samples`` Rademacher draws z of z ∘ (H z); all Hessian-vector products in one vmap.

    With per_sample=True every sample's Hessian is probed with the same draws."""
    loss, params = _loss(model, loss_fn), _parameters(model)
    probes = rademacher(params, samples, generator)

    def estimate(params, x, t, probes, f):
        _, hvp = vjp(lambda p: grad(f)(p, x, t), params)  # reverse over reverse: Hᵀ v = H v
        (hz,) = vmap(hvp, randomness="same")(probes)
        return {k: (probes[k] * hz[k]).mean(0) for k in params}

    if per_sample:
        return vmap(estimate, in_dims=(None, 0, _target_dim(targets), None, None), randomness="different")(
            params, inputs, targets, probes, _of_one(loss)
        )
    return estimate(params, inputs, targets, probes, loss)
