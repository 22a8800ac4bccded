"""Recording the user's own forward pass, so an optimizer can backpropagate curvature from a loss.

``extend(model)`` and ``extend(loss_fn)`` (as in BackPACK) register forward hooks. While
gradients are enabled, every hooked module appends its context to the chain of steps carried by
its output tensor, and the hooked loss module turns the chain into a ``Tape`` kept in the
metadata of the loss's autograd node. A chain is only continued from a module's input, so
anything computed outside the hooked modules breaks it, and the parameters it cannot reach are
reported instead of wrong numbers returned.

A loss handed to an optimizer may be a weighted sum Σ c_k · L_k of such losses, each c_k a
number: ``recorded_terms`` reads the coefficients off the autograd graph (+, −, unary −, and *
or / by a number), down to the nodes that carry a tape; anything else is an error naming it.
Several losses may share one network output (a policy-gradient loss and an entropy bonus).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from hsbench.curvature.loss_rules import LOSS_RULES, loss_rule
from hsbench.curvature.modules import layers
from hsbench.curvature.tape import Step, Tape

_STEPS = "_hsbench_steps"  # attribute of an intermediate output: the steps that produced it
_SHARED = "_hsbench_chain"  # attribute of a network output: weak reference to its steps, once a loss took them
_TAPE = "hsbench_tape"  # key in the metadata of a loss's autograd node: its tape


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
            leaf.register_forward_hook(_Recorder(position, rule))
    # an attribute (not a set of modules) so that a deepcopy, which copies the hooks, counts as extended too;
    # torch types Module attributes as Tensor | Module
    module._hsbench_extended = True  # type: ignore[assignment]
    return module


class _Recorder:
    """The forward hook of one module: appends its step to the chain its output carries. A class,
    not a closure, so that an extended model pickles (``torch.save``) with its hooks."""

    __slots__ = ("position", "rule")

    def __init__(self, position: str, rule) -> None:
        self.position, self.rule = position, rule

    def __call__(self, module, args, output):
        rule = self.rule
        y, recorded = rule.split(module, output)
        if torch.is_grad_enabled():
            x = args[0]
            steps = x.__dict__.pop(_STEPS, ())  # taken, not shared: no reference cycles stay behind
            setattr(y, _STEPS, (*steps, Step(self.position, module, rule, rule.context(module, x, y, recorded))))
        return y


class _Chain(list):
    """The steps of a network output, shared by the tapes of every loss on it (weakly referable)."""


def _record_loss(module, args, output):
    z, target = args[0], (args[1] if len(args) > 1 else None)  # a loss without target is called as loss_fn(z)
    if not isinstance(output, Tensor) or output.grad_fn is None:
        return
    steps = z.__dict__.pop(_STEPS, None)  # taken: z's last step may hold z itself (no cycle stays)
    if steps is not None:
        chain = _Chain(steps)
        setattr(z, _SHARED, weakref.ref(chain))  # weak: z -> chain -> z would be a cycle
    else:  # a further loss on the same output: the chain of the tapes still alive
        chain = z.__dict__.get(_SHARED, lambda: None)()
        if chain is None:
            return
    output.grad_fn.metadata[_TAPE] = Tape(chain, z, target, loss_rule(module))  # lives as long as the loss's graph


def _not_recorded(who: str, found: str) -> RuntimeError:
    return RuntimeError(
        f"{who} needs a loss returned by a loss module registered with hsbench.curvature.extend(loss_fn), "
        "computed from a model registered with extend(model) with gradients enabled, or a sum of such "
        f"losses times numbers (+, -, and * or / by a number); found {found}"
    )


def recorded_terms(loss: Tensor, who: str) -> list[tuple[float, Tape]]:
    """The terms (c_k, tape of L_k) of ``loss`` = Σ c_k · L_k, each L_k the output of an extended
    loss module and c_k a number (a loss met twice appears once, coefficients added)."""
    if not isinstance(loss, Tensor) or loss.grad_fn is None:
        raise _not_recorded(who, "a tensor without autograd graph" if isinstance(loss, Tensor) else type(loss).__name__)
    if loss.numel() != 1:
        raise _not_recorded(who, f"a loss of shape {tuple(loss.shape)}")
    terms: dict[int, list] = {}  # id(tape) -> [coefficient, tape], in the expression's left-to-right order
    _walk(loss.grad_fn, 1.0, terms, who)
    return [(c, tape) for c, tape in terms.values()]


def _walk(node, c: float, terms: dict[int, list], who: str) -> None:
    """Add the terms below autograd node ``node``, times ``c``, to ``terms`` (a module-level function:
    a recursive closure would be a reference cycle holding the tapes)."""
    tape = node.metadata.get(_TAPE)
    if tape is not None:
        terms.setdefault(id(tape), [0.0, tape])[0] += c
        return
    inputs = [f for f, _ in node.next_functions]
    kind = type(node).__name__
    if kind in ("AddBackward0", "SubBackward0") and len(inputs) == 2:
        alpha = node._saved_alpha * (1 if kind == "AddBackward0" else -1)
        for f, weight in zip(inputs, (1.0, alpha), strict=True):
            if f is not None:  # None: a constant, no derivatives
                _walk(f, c * weight, terms, who)
    elif kind == "NegBackward0":
        _walk(inputs[0], -c, terms, who)
    elif kind in ("MulBackward0", "DivBackward0") and sum(f is not None for f in inputs) == 1:
        loss_side = 0 if inputs[0] is not None else 1
        factor = node._saved_other if loss_side == 0 else node._saved_self
        if factor is None or factor.numel() != 1 or (kind == "DivBackward0" and loss_side == 1):
            raise _not_recorded(who, f"{kind} of a loss and a tensor that is not a number")
        number = float(factor)
        _walk(inputs[loss_side], c * (number if kind == "MulBackward0" else 1 / number), terms, who)
    else:
        two_losses = kind in ("MulBackward0", "DivBackward0")
        raise _not_recorded(who, "a product or quotient of two losses" if two_losses else kind)


def reached_parameters(tapes: list[Tape], who: str, parameters: Sequence[Tensor] | None = None) -> list[Tensor]:
    """The trainable parameters of the tapes' recorded steps, each once, in recorded order;
    ``RuntimeError`` if a tensor in ``parameters`` is not a parameter of a recorded step."""
    reached = {id(p): p for tape in tapes for step in tape.steps for p in step.parameters}
    missing = [tuple(p.shape) for p in parameters or () if id(p) not in reached]
    if missing:
        raise RuntimeError(
            f"{who}: {len(missing)} parameter(s) (shapes {missing}) are not reached by the recorded forward "
            "pass; the model must be a chain of extended modules from its input to the loss"
        )
    return [p for p in reached.values() if p.requires_grad]


def tape_of(loss: Tensor, parameters: list[Tensor], who: str) -> Tape:
    """The tape of ``loss``, the direct output of an extended loss module, checked to reach ``parameters``."""
    terms = recorded_terms(loss, who)
    if len(terms) != 1 or terms[0][0] != 1.0:
        raise _not_recorded(who, f"a weighted sum of {len(terms)} losses where one loss is expected")
    reached_parameters([terms[0][1]], who, parameters)  # for its check only
    return terms[0][1]
