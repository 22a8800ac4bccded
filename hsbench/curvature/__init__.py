"""Hessian-diagonal estimators behind one entry point, ``diagonal``.

Every method returns, for each trainable parameter of the model (keyed as in
``model.named_parameters()``), its estimate of the diagonal of the Hessian of the loss
``loss_fn(model(inputs), targets)`` w.r.t. that parameter, same shape as the parameter.
"""

from __future__ import annotations

from torch import Tensor, nn

from hsbench.curvature.estimators import ESTIMATORS, Batch
from hsbench.curvature.recording import extend

METHODS = tuple(ESTIMATORS)
"""Method names: exact Hessian, exact GGN, Monte-Carlo GGN, Hutchinson (AdaHessian), squared
gradient, KFAC, HesScale, HesScaleGN, Becker & LeCun 1989 (``estimators.ESTIMATORS``)."""

__all__ = ["METHODS", "diagonal", "diagonals", "extend"]


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
        model: an ``nn.Sequential`` (nesting allowed) of supported modules; ``hutchinson`` and
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
    return diagonals({method: (method, mc_samples)}, model, loss_fn, inputs, targets, per_sample=per_sample, generator=generator)[method]


def diagonals(
    requests: dict[str, tuple[str, int]],
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets,
    *,
    per_sample: bool = False,
    generator=None,
) -> dict[str, dict[str, Tensor]]:
    """Several estimates on one batch, sharing one recorded forward pass.

    ``requests`` maps a label to ``(method, mc_samples)``, e.g. ``{"ggn-mc-50": ("ggn-mc", 50)}``;
    the result maps each label to what ``diagonal`` returns for it. Draws are made in the order
    of ``requests``."""
    for method, mc_samples in requests.values():
        if method not in METHODS:
            raise ValueError(f"unknown curvature method {method!r}; valid methods: {', '.join(METHODS)}")
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}")
    batch = Batch(model, loss_fn, inputs, targets)
    return {
        label: ESTIMATORS[method](batch, mc_samples, generator, per_sample)
        for label, (method, mc_samples) in requests.items()
    }
