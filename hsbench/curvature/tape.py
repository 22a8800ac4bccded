"""The recorded forward pass that every backpropagation method walks backward."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from hsbench.curvature.contracts import Context, Elementwise, ModuleRule
from hsbench.curvature.loss_rules import LossRule, loss_rule
from hsbench.curvature.modules import layers


@dataclass
class Step:
    """One module of the forward pass: its position in the model, the module, its rule and context."""

    position: str
    module: nn.Module
    rule: ModuleRule
    ctx: Context
    parameters: tuple[Tensor, ...] = field(init=False, repr=False, compare=False)
    """The module's own parameters, read once per recorded step (the walks ask several times) off
    its ``_parameters`` dict: ``parameters(recurse=False)`` costs microseconds per module through
    its generators, which the optimizers pay for every module at every step."""
    has_parameters: bool = field(init=False, repr=False, compare=False)
    """Whether any of them is trainable."""

    def __post_init__(self) -> None:
        # set when recorded, not as cached properties: on Python 3.11 a cached property's first
        # read takes a lock, microseconds that every step of every update would pay
        self.parameters = tuple(p for p in self.module._parameters.values() if p is not None)
        self.has_parameters = any(p.requires_grad for p in self.parameters)

    def accumulate(self, into: dict[Tensor, Tensor], values: dict[str, Tensor]) -> None:
        """Add values keyed by the module's local parameter names ('weight', 'bias') into ``into``,
        keyed by the parameter tensors themselves (a parameter used twice gets the sum). Read off
        ``_parameters``: ``getattr`` goes through ``nn.Module.__getattr__``, in Python."""
        for local, value in values.items():
            p = self.module._parameters[local]
            if p is not None and p.requires_grad:
                into[p] = into[p] + value if p in into else value


@dataclass
class Tape:
    """Forward pass of ``model`` on a batch: per-module contexts, the output z and the loss rule."""

    steps: list[Step]
    output: Tensor
    target: object
    loss: LossRule
    shared: bool = False  # walked several times (a ``Batch``'s recording): activation derivatives are kept
    _derivatives: dict[str, Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _activations: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def loss_derivatives(self, *names: str) -> tuple[Tensor, ...]:
        """``self.loss.<name>(output, target)`` for each name ("grad", "hessian_diagonal",
        "bl89_diagonal", "hessian"), each computed once per tape: the walks of one recording share
        them, and must not change them in place. The gradient and one diagonal asked for together,
        neither computed yet, come from one ``LossRule.grad_and_diagonal`` call (one softmax for
        both with cross-entropy)."""
        known = self._derivatives
        diagonals = [name for name in names if name in ("hessian_diagonal", "bl89_diagonal")]
        if "grad" in names and len(diagonals) == 1 and "grad" not in known and diagonals[0] not in known:
            known["grad"], known[diagonals[0]] = self.loss.grad_and_diagonal(self.output, self.target, diagonals[0])
        for name in names:
            if name not in known:
                known[name] = getattr(self.loss, name)(self.output, self.target)
        return tuple(known[name] for name in names)

    def activation_derivatives(self, step: Step) -> tuple[Tensor, Tensor]:
        """(σ'(x), σ''(x)) of an elementwise ``step`` (``Elementwise.derivatives``). A ``shared``
        tape computes them once and keeps them for its other walks, which must not change them in
        place; any other computes them per call (an optimizer's recording is walked once, and kept
        they would hold activation-sized tensors as long as the loss's graph)."""
        assert isinstance(step.rule, Elementwise)
        if not self.shared:
            return step.rule.derivatives(step.module, step.ctx)
        if step.position not in self._activations:  # a position names one step of a tape
            self._activations[step.position] = step.rule.derivatives(step.module, step.ctx)
        return self._activations[step.position]

    def backward_steps(self) -> Iterator[tuple[Step, bool]]:
        """Steps from last to first, each with ``need_input``: whether the step's input still needs a
        backpropagated quantity (False from the first module with parameters on)."""
        first = next((i for i, s in enumerate(self.steps) if s.has_parameters), len(self.steps))
        for i in range(len(self.steps) - 1, first - 1, -1):
            yield self.steps[i], i > first

    def scale(self) -> float:
        return self.loss.scale(self.output)


def record(model: nn.Module, loss_fn: nn.Module, inputs: Tensor, targets, shared: bool = False) -> Tape:
    """Run ``model`` on ``inputs`` module by module (no autograd graph) and keep what backward
    needs; ``shared``: see ``Tape``."""
    rule = loss_rule(loss_fn)
    steps = []
    x = inputs
    with torch.no_grad():
        for position, module, module_rule in layers(model):
            y = module(x)
            steps.append(Step(position, module, module_rule, module_rule.context(module, x, y)))
            x = y
    return Tape(steps, x, targets, rule, shared)


class Backward(NamedTuple):
    """What a backward walk yields, keyed by the parameter tensors: gradients and diagonals."""

    gradients: dict[Tensor, Tensor]
    diagonals: dict[Tensor, Tensor]
