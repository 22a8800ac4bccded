"""The curvature methods as one table ``{method: estimator}``.

Every estimator has the signature of ``Estimator`` and returns ``{parameter name: Tensor}`` for
the trainable parameters of the batch's model (keyed as in ``model.named_parameters()``), each
of the parameter's shape, with a leading batch dimension if ``per_sample``. A new method is one
estimator (a walk of its own in a new file, or an existing walk with other options) plus one line
in ``ESTIMATORS``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from hsbench.curvature import autograd_estimators, diagonal_backprop, hessian_backprop, sampled_backprop
from hsbench.curvature.tape import Tape, record


@dataclass
class Batch:
    """One batch of a problem: ``loss_fn(model(inputs), targets)``. The methods that walk the
    recorded forward pass share one recording, made on first use. ``gradient_along``: the first
    HesScale-family estimate of the batch loss (not a per-sample one) also computes its gradient,
    for ``gradient``."""

    model: nn.Module
    loss_fn: nn.Module
    inputs: Tensor
    targets: object
    gradient_along: bool = False
    _tape: Tape | None = field(default=None, repr=False)
    _gradient: dict[str, Tensor] | None = field(default=None, repr=False)

    def tape(self) -> Tape:
        if self._tape is None:
            self._tape = record(self.model, self.loss_fn, self.inputs, self.targets, shared=True)
        return self._tape

    @functools.cached_property
    def trainable(self) -> list[tuple[str, Tensor]]:
        """(name, parameter) of the model's trainable parameters, listed once per batch."""
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def gradient(self) -> dict[str, Tensor]:
        """The batch loss's gradient by parameter name, from the recording: autograd's gradient up
        to float rounding, without a second forward pass. With ``gradient_along`` taken from the
        first HesScale-family estimate of this batch, else from a walk of its own."""
        if self._gradient is None:
            with torch.no_grad():
                self._gradient = self.by_name(diagonal_backprop.backpropagate(self.tape(), "hesscale-gn").gradients)
        return self._gradient

    def by_name(self, found: dict[Tensor, Tensor]) -> dict[str, Tensor]:
        """Values keyed by parameter tensor -> keyed by parameter name, trainable parameters only."""
        return {name: found[p] for name, p in self.trainable}


class Estimator(Protocol):
    def __call__(
        self, batch: Batch, mc_samples: int, generator: torch.Generator | None, per_sample: bool
    ) -> dict[str, Tensor]: ...


def _squared_gradient(batch, mc_samples, generator, per_sample):
    return autograd_estimators.squared_gradient(batch.model, batch.loss_fn, batch.inputs, batch.targets, per_sample)


def _hutchinson(batch, mc_samples, generator, per_sample):
    [estimate] = hutchinson_sets(batch, [mc_samples], generator, per_sample)
    return estimate


def hutchinson_sets(
    batch: Batch, sample_counts: list[int], generator: torch.Generator | None, per_sample: bool
) -> list[dict[str, Tensor]]:
    """Hutchinson estimates with these sample counts, the draws of as many successive calls, in one
    pass (``autograd_estimators.hutchinson_sets``) on the batch's shared recording where there is one."""
    try:
        tape = None if per_sample else batch.tape()
    except ValueError:  # a model or loss the curvature core does not know: autograd's products
        tape = None
    return autograd_estimators.hutchinson_sets(
        batch.model, batch.loss_fn, batch.inputs, batch.targets, sample_counts, generator, per_sample, tape
    )


def _diagonal_backprop(variant: str) -> Estimator:
    def estimate(batch, mc_samples, generator, per_sample):
        along = batch.gradient_along and batch._gradient is None and not per_sample  # for ``Batch.gradient``
        with torch.no_grad():
            found = diagonal_backprop.backpropagate(batch.tape(), variant, per_sample, gradients=along)
        if along:
            batch._gradient = batch.by_name(found.gradients)
        return batch.by_name(found.diagonals)

    return estimate


def _hessian_backprop(curvature_of_activations: bool) -> Estimator:
    def estimate(batch, mc_samples, generator, per_sample):
        with torch.no_grad():
            return batch.by_name(hessian_backprop.backpropagate(batch.tape(), curvature_of_activations, per_sample))

    return estimate


def _sampled_backprop(method: str) -> Estimator:
    def estimate(batch, mc_samples, generator, per_sample):
        with torch.no_grad():
            found = sampled_backprop.backpropagate(
                batch.tape(), method, mc_samples, generator, per_sample, gradients=False
            )
            return batch.by_name(found.diagonals)

    return estimate


ESTIMATORS: dict[str, Estimator] = {
    "exact": _hessian_backprop(curvature_of_activations=True),  # exact Hessian
    "ggn": _hessian_backprop(curvature_of_activations=False),  # exact GGN
    "ggn-mc": _sampled_backprop("ggn-mc"),  # Monte-Carlo GGN
    "hutchinson": _hutchinson,  # AdaHessian's estimator
    "grad2": _squared_gradient,  # squared gradient
    "kfac": _sampled_backprop("kfac"),
    "hesscale": _diagonal_backprop("hesscale"),
    "hesscale-gn": _diagonal_backprop("hesscale-gn"),
    "bl89": _diagonal_backprop("bl89"),  # Becker & LeCun 1989
}
