"""Recording the user's own forward pass, so an optimizer can backpropagate curvature from a loss.

``extend(model)`` and ``extend(loss_fn)`` (as in BackPACK) register forward hooks. While
gradients are enabled, every hooked module appends its context to the chain of steps carried by
its output tensor, and the hooked loss module turns the chain into a ``Tape`` attached to the
loss tensor; ``tape_of(loss)`` takes it back. A chain is only continued from a module's input,
so anything computed outside the hooked modules breaks it and ``tape_of`` reports the
parameters it cannot reach instead of returning wrong numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hsbench.curvature.loss_rules import LOSS_RULES, loss_rule
from hsbench.curvature.modules import layers
from hsbench.curvature.tape import Step, Tape

_STEPS = "_hsbench_steps"  # attribute of an intermediate output: the steps that produced it
_TAPE = "_hsbench_tape"  # attribute of a loss tensor: its tape


def extend(module: nn.Module) -> nn.Module:
    """Register ``module`` (a supported model or loss) for curvature backpropagation; returns it."""
    if getattr(module, "_hsbench_extended", False):
        return module
    if type(module) in LOSS_RULES:
        loss_rule(module)  # validates the configuration now
        module.register_forward_hook(_record_loss)
    else:
        for position, leaf, rule in layers(module):
            rule.prepare(leaf)
            leaf.register_forward_hook(_recorder(position, rule))
    module._hsbench_extended = True
    return module


def _recorder(position, rule):
    def record(module, args, output):
        y, recorded = rule.split(module, output)
        if torch.is_grad_enabled():
            x = args[0]
            steps = x.__dict__.pop(_STEPS, ())  # taken, not shared: no reference cycles stay behind
            setattr(y, _STEPS, (*steps, Step(position, module, rule, rule.context(module, x, y, recorded))))
        return y

    return record


def _record_loss(module, args, output):
    z, target = args[0], (args[1] if len(args) > 1 else None)  # a loss without target is called as loss_fn(z)
    steps = z.__dict__.pop(_STEPS, None)
    if steps is not None:
        setattr(output, _TAPE, Tape(list(steps), z, target, loss_rule(module)))


def tape_of(loss: Tensor, parameters: list[Tensor], who: str) -> Tape:
    """The tape of ``loss`` (taken off it), checked to reach every tensor in ``parameters``."""
    tape = loss.__dict__.pop(_TAPE, None) if isinstance(loss, Tensor) else None
    if tape is None:
        raise RuntimeError(
            f"{who} needs the loss exactly as returned by a loss module registered with "
            "hsbench.curvature.extend(loss_fn), computed from a model registered with extend(model) "
            "with gradients enabled"
        )
    reached = {id(p) for step in tape.steps for p in step.module.parameters(recurse=False)}
    missing = [tuple(p.shape) for p in parameters if id(p) not in reached]
    if missing:
        raise RuntimeError(
            f"{who}: {len(missing)} parameter(s) (shapes {missing}) are not reached by the recorded forward "
            "pass; the model must be a chain of extended modules from its input to the loss"
        )
    return tape
