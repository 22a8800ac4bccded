"""Hessian-diagonal estimators behind one entry point, ``diagonal``.

Every method returns, for each trainable parameter of the model (keyed as in
``model.named_parameters()``), its estimate of the diagonal of the Hessian of the loss
``loss_fn(model(inputs), targets)`` w.r.t. that parameter, same shape as the parameter.

``loss_diagonals(loss, method)`` does the same for a loss the user computed with extended
modules (``extend``), also a weighted sum of such losses, e.g. ``pg - 0.01 * entropy + 0.5 * v``
over an actor and a critic network; it is what the optimizers of ``hsbench.optim`` call.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from hsbench.curvature import diagonal_backprop, hessian_backprop, sampled_backprop
from hsbench.curvature.autograd_estimators import rademacher
from hsbench.curvature.estimators import ESTIMATORS, Batch, hutchinson_sets
from hsbench.curvature.loss_rules import LossRule
from hsbench.curvature.recording import extend, reached_parameters, recorded_terms
from hsbench.curvature.tape import Backward, Tape

METHODS = tuple(ESTIMATORS)
"""Method names: exact Hessian, exact GGN, Monte-Carlo GGN, Hutchinson (AdaHessian), squared
gradient, KFAC, HesScale, HesScaleGN, Becker & LeCun 1989 (``estimators.ESTIMATORS``)."""

__all__ = ["METHODS", "Batch", "batch_diagonals", "diagonal", "diagonals", "extend", "loss_diagonals"]


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
    return diagonals(
        {method: (method, mc_samples)}, model, loss_fn, inputs, targets, per_sample=per_sample, generator=generator
    )[method]


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
    of ``requests``; consecutive Hutchinson requests share one pass of Hessian-vector products
    (the same draws as one by one)."""
    batch = Batch(model, loss_fn, inputs, targets)
    return batch_diagonals(batch, requests, per_sample=per_sample, generator=generator)


def batch_diagonals(
    batch: Batch, requests: dict[str, tuple[str, int]], *, per_sample: bool = False, generator=None
) -> dict[str, dict[str, Tensor]]:
    """``diagonals`` on a ``Batch``, whose one recording later calls may share (``Batch.gradient``)."""
    for method, mc_samples in requests.values():
        if method not in METHODS:
            raise ValueError(f"unknown curvature method {method!r}; valid methods: {', '.join(METHODS)}")
        if not (isinstance(mc_samples, int) and mc_samples >= 1):
            raise ValueError(f"mc_samples must be a positive integer; got {mc_samples!r}")
    found: dict[str, dict[str, Tensor]] = {}
    for hutchinson, run in itertools.groupby(requests, key=lambda label: requests[label][0] == "hutchinson"):
        labels = list(run)
        if hutchinson:
            counts = [requests[label][1] for label in labels]
            found.update(zip(labels, hutchinson_sets(batch, counts, generator, per_sample), strict=True))
        else:
            for label in labels:
                method, mc_samples = requests[label]
                found[label] = ESTIMATORS[method](batch, mc_samples, generator, per_sample)
    return found


TapeWalk = Callable[[Tape, int, "torch.Generator | None", bool], Backward]
"""A method that walks a recorded forward pass backward: (tape, mc_samples, generator, factored)
-> gradients (empty where the walk has none) and diagonals, keyed by parameter. ``factored``:
rank-one weight diagonals at batch size one where the walk can keep them so (the HesScale
variants, ``diagonal_backprop.backpropagate``); the other walks write every diagonal out."""


def _hessian_walk(exact: bool) -> TapeWalk:
    return lambda tape, samples, generator, factored: Backward({}, hessian_backprop.backpropagate(tape, exact))


def _sampled_walk(method: str) -> TapeWalk:
    return lambda tape, samples, generator, factored: sampled_backprop.backpropagate(tape, method, samples, generator)


def _diagonal_walk(variant: str) -> TapeWalk:
    return lambda tape, samples, generator, factored: diagonal_backprop.backpropagate(tape, variant, False, factored)


_TAPE_WALKS: dict[str, TapeWalk] = {
    "exact": _hessian_walk(True),
    "ggn": _hessian_walk(False),
    "ggn-mc": _sampled_walk("ggn-mc"),
    "kfac": _sampled_walk("kfac"),
    **{variant: _diagonal_walk(variant) for variant in diagonal_backprop.VARIANTS},
}


def loss_diagonals(
    loss: Tensor,
    method: str,
    *,
    parameters: Sequence[Tensor] | None = None,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    who: str = "hsbench.curvature.loss_diagonals",
    factored: bool = False,
) -> Backward:
    """Gradient and Hessian-diagonal estimate of a recorded ``loss``, keyed by parameter tensor.

    ``loss`` is the output of a loss module registered with ``extend``, computed from a model
    registered with ``extend`` with gradients enabled, or a weighted sum Σ c_k · L_k of such
    losses with numbers c_k (``+``, ``-``, and ``*`` or ``/`` by a number), on one or several
    networks. For the methods that walk the recording (exact, ggn, ggn-mc, kfac, hesscale,
    hesscale-gn, bl89) the result is Σ c_k × (gradient, diagonal of L_k), Monte-Carlo draws made
    term by term from left to right; ``hutchinson`` is z ∘ (H z) of the sum (the same probes z
    for every term) and ``grad2`` the square of the sum's gradient. Anything else in the
    expression (a product of losses, a loss not from extended modules) is a ``RuntimeError``
    naming it. Keys: every trainable parameter the recorded forward passes reach; if
    ``parameters`` is given, a ``RuntimeError`` lists those of them not reached. ``factored``:
    see ``TapeWalk``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown curvature method {method!r}; valid methods: {', '.join(METHODS)}")
    terms = recorded_terms(loss, who)
    reached = reached_parameters([tape for _, tape in terms], who, parameters)
    if method not in _TAPE_WALKS:  # hutchinson, grad2: autograd through the loss's own graph
        return _autograd_diagonals(loss, reached, method, mc_samples, generator)
    if method not in ("ggn-mc", "kfac"):  # linear in the output's (g, H): one walk per network output
        terms = _combined_per_output(terms)
    grads: dict[Tensor, Tensor] = {}
    diags: dict[Tensor, Tensor] = {}
    with torch.no_grad():
        for c, tape in terms:
            found = _TAPE_WALKS[method](tape, mc_samples, generator, factored)
            if len(terms) == 1 and c == 1.0:  # the walk's own dicts
                grads, diags = found.gradients, found.diagonals
                break
            for into, values in ((grads, found.gradients), (diags, found.diagonals)):
                for p, value in values.items():
                    value = value if c == 1.0 else c * value
                    into[p] = into[p] + value if p in into else value
    if not grads:  # exact, ggn: the gradient from autograd
        grads = dict(zip(reached, torch.autograd.grad(loss, reached, retain_graph=True), strict=True))
    return Backward(grads, diags)


def _autograd_diagonals(loss: Tensor, params: list[Tensor], method: str, samples: int, generator) -> Backward:
    """``hutchinson`` (mean over ``samples`` Rademacher z of z ∘ Hz) or ``grad2`` (g²) of ``loss``."""
    grads = torch.autograd.grad(loss, params, create_graph=method == "hutchinson", retain_graph=True)
    gradients = {p: g.detach() for p, g in zip(params, grads, strict=True)}
    if method == "grad2":
        return Backward(gradients, {p: g.square() for p, g in gradients.items()})
    probes = list(rademacher({str(i): p for i, p in enumerate(params)}, samples, generator).values())
    diags = [torch.zeros_like(p) for p in params]
    for m in range(samples):
        z = [probe[m] for probe in probes]
        hz = torch.autograd.grad(grads, params, z, retain_graph=True, allow_unused=True)
        for d, z_p, h in zip(diags, z, hz, strict=True):
            if h is not None:  # None: a parameter on which the gradient does not depend
                d += z_p * h.detach() / samples
    return Backward(gradients, dict(zip(params, diags, strict=True)))


class _WeightedSum(LossRule):
    """The loss rule of Σ_k c_k · L_k on one network output z: its derivatives w.r.t. z are the
    weighted sums of the terms', each term's reduction scale folded into its weight."""

    def __init__(self, parts: list[tuple[float, LossRule, object]]):
        self.parts = parts  # (c_k · scale_k, rule of L_k, target of L_k)

    def scale(self, z: Tensor) -> float:
        return 1.0

    def _sum(self, derivative: str, z: Tensor) -> Tensor:
        values = [w * getattr(rule, derivative)(z, target) for w, rule, target in self.parts]
        return values[0] if len(values) == 1 else torch.stack(values).sum(0)

    def grad(self, z, target):
        return self._sum("grad", z)

    def hessian_diagonal(self, z, target):
        return self._sum("hessian_diagonal", z)

    def bl89_diagonal(self, z, target):
        return self._sum("bl89_diagonal", z)

    def hessian(self, z, target):
        return self._sum("hessian", z)


def _combined_per_output(terms: list[tuple[float, Tape]]) -> list[tuple[float, Tape]]:
    """Terms on the same network output (the same recorded steps) merged into one tape with
    coefficient 1 whose loss rule is their weighted sum (``_WeightedSum``); a single term c · L
    with c ≠ 1 too, so that c multiplies the output's derivatives, not every parameter's results."""
    groups: dict[tuple[int, int], list[tuple[float, Tape]]] = {}
    for c, tape in terms:
        groups.setdefault((id(tape.steps), id(tape.output)), []).append((c, tape))
    combined = []
    for group in groups.values():
        if len(group) == 1 and group[0][0] == 1.0:
            combined.append(group[0])
            continue
        first = group[0][1]
        parts = [(c * tape.scale(), tape.loss, tape.target) for c, tape in group]
        combined.append((1.0, Tape(first.steps, first.output, None, _WeightedSum(parts))))
    return combined
