"""Hessian-diagonal estimators behind one entry point, ``diagonal``.

Every method returns, for each trainable parameter of the model (keyed as in
``model.named_parameters()``), its estimate of the diagonal of the Hessian of the loss
``loss_fn(model(inputs), targets)`` w.r.t. that parameter, same shape as the parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hsbench.curvature import autograd_estimators, diagonal_backprop, hessian_backprop, sampled_backprop
from hsbench.curvature.tape import record

METHODS = ("exact", "ggn", "ggn-mc", "hutchinson", "grad2", "kfac", "hesscale", "hesscale-gn", "bl89")
"""Method names: exact Hessian, exact GGN, Monte-Carlo GGN, Hutchinson (AdaHessian), squared
gradient, KFAC, HesScale, HesScaleGN, Becker & LeCun 1989."""

STOCHASTIC = ("ggn-mc", "hutchinson", "kfac")
"""Methods that draw ``mc_samples`` random vectors (using ``generator``)."""


def diagonal(
    method: str,
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets,
    *,
    per_sample: bool = False,
    mc_samples: int = 1,
    generator=None,
) -> dict[str, Tensor]:
    """Estimate of the Hessian diagonal of ``loss_fn(model(inputs), targets)`` per parameter.

    Args:
        method: one of ``METHODS``.
        model: an ``nn.Sequential`` (nested allowed) of supported modules; ``hutchinson`` and
            ``grad2`` accept any model.
        loss_fn: ``nn.CrossEntropyLoss``, ``nn.MSELoss`` or a loss of ``hsbench.losses``, with
            reduction 'mean' or 'sum' (any differentiable loss for ``hutchinson`` and ``grad2``).
        targets: a tensor, or a tuple of tensors for the policy losses.
        per_sample: if True, every value has a leading batch dimension holding the diagonal of
            each sample's own loss ℓ_n (the loss of that sample alone). For reduction='mean' their
            mean equals the batch result for every method that is linear in the batch; ``grad2``
            and ``kfac`` (products of batch statistics) are not.
        mc_samples: number of Monte-Carlo draws for ``ggn-mc``, ``hutchinson`` and ``kfac``.
        generator: ``torch.Generator`` for those draws.

    Returns:
        ``{parameter name: Tensor}``, each of the parameter's shape (with a leading batch
        dimension if ``per_sample``), for the parameters with ``requires_grad``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown curvature method {method!r}; valid methods: {', '.join(METHODS)}")
    if not (isinstance(mc_samples, int) and mc_samples >= 1):
        raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}")
    if method == "grad2":
        return autograd_estimators.squared_gradient(model, loss_fn, inputs, targets, per_sample)
    if method == "hutchinson":
        return autograd_estimators.hutchinson(model, loss_fn, inputs, targets, mc_samples, generator, per_sample)
    tape = record(model, loss_fn, inputs, targets)
    with torch.no_grad():
        if method in diagonal_backprop.VARIANTS:
            found = diagonal_backprop.backpropagate(tape, method, per_sample)[1]
        elif method in ("exact", "ggn"):
            found = hessian_backprop.backpropagate(tape, method == "exact", per_sample)
        else:
            found = sampled_backprop.backpropagate(tape, method, mc_samples, generator, per_sample)[1]
    return {name: found[p] for name, p in model.named_parameters() if p.requires_grad}
