"""HesScale, HesScaleGN and BL89: backpropagation of a diagonal Hessian estimate (Eq. 3–4, 10–11).

Walking backward, ŝ estimates the diagonal of ∂²ℓ/∂y² at each module output y and g = ∂ℓ/∂y:

* through a linear map y = J x:   ŝ_x = Σ_o J_oi² ŝ_o          (off-diagonal terms dropped),
* through an activation y = σ(x): ŝ_x = σ'(x)² ŝ_y + σ''(x) g_y  (HesScaleGN drops the σ'' term),
* at a weight of a linear map:     ŝ_W = Σ_positions ŝ_y x²     (Eq. 3 and 11).

HesScale starts from the exact diagonal of the loss Hessian w.r.t. the network output
(appendices B, C); BL89 applies the same diagonal rule to the output nonlinearity too, starting
from the diagonal w.r.t. the distribution's probabilities (see ``LossRule.bl89_diagonal``).
"""

from __future__ import annotations

from typing import Any, cast

from torch import Tensor

from hsbench.curvature import native
from hsbench.curvature.contracts import Elementwise, ParametrizedRule
from hsbench.curvature.modules import Activation, Linear, RankOne
from hsbench.curvature.tape import Backward, Tape

VARIANTS = ("hesscale", "hesscale-gn", "bl89")


def backpropagate(
    tape: Tape, variant: str, per_sample: bool = False, factored: bool = False, gradients: bool = True
) -> Backward:
    """Gradient and diagonal estimate of every trainable parameter, keyed by the parameter.

    Batch results (per_sample=False) are those of the batch loss; per-sample results have a
    leading batch dimension and belong to each sample's own loss ℓ_n (unscaled). ``factored``:
    for a batch of one sample, the diagonals of linear layers' weights are ``RankOne`` factors,
    not tensors (for the optimizers, which never need them written out). ``gradients=False``:
    the parameters' gradients are not computed (empty), only ∂ℓ/∂y that the diagonals need.
    Factored with gradients, a chain of linear layers and activations is walked in C
    (``native.diagonal_walk``: bit for bit where this walk uses ``native.linear_pullbacks``, else
    the same numbers to rounding)."""
    z = tape.output
    scale = 1.0 if per_sample else tape.scale()  # everything below is linear in (g, ŝ) at the output
    g, s = tape.loss_derivatives("grad", "bl89_diagonal" if variant == "bl89" else "hessian_diagonal")
    factored = factored and not per_sample and z.shape[0] == 1
    if factored and gradients:
        walked = _walked_natively(tape, variant, g, s, scale)
        if walked is not None:
            return walked
    g = (scale * g).reshape(z.shape[0], 1, *z.shape[1:])
    s = (scale * s).reshape(g.shape)
    grads: dict[Tensor, Tensor] = {}
    diags: dict[Tensor, Tensor] = {}
    for step, need_input in tape.backward_steps():
        module, rule, ctx = step.module, step.rule, step.ctx
        if isinstance(rule, Elementwise):
            d1, d2 = (d.unsqueeze(1) for d in tape.activation_derivatives(step))
            s.mul_(d1).mul_(d1)  # in place: g and ŝ are this pass's own tensors
            if variant != "hesscale-gn":
                s.addcmul_(d2, g)
            g.mul_(d1)
            continue
        if isinstance(rule, ParametrizedRule) and step.has_parameters:  # input and parameter parts in one call
            if factored and isinstance(rule, Linear):
                g_in, sums, s_in, diagonal_sums = rule.factored_pullbacks(module, ctx, g, s, need_input, gradients)
                step.accumulate(grads, sums)
            else:
                if gradients:
                    g_in, sums = rule.pullback(module, ctx, g, need_input, per_sample)
                    step.accumulate(grads, sums)
                else:
                    g_in = rule.vjp(module, ctx, g) if need_input else None
                s_in, diagonal_sums = rule.squared_pullback(module, ctx, s, need_input, per_sample)
            step.accumulate(diags, diagonal_sums)
            if g_in is None or s_in is None:  # need_input was False: the first module with parameters, the last step
                break
            g, s = g_in, s_in
        elif need_input:
            g, s = rule.vjp(module, ctx, g), rule.vjp_squared(module, ctx, s)
    return Backward(grads, diags)


def _walked_natively(tape: Tape, variant: str, g: Tensor, s: Tensor, scale: float) -> Backward | None:
    """``backpropagate`` factored, with gradients, through a chain of linear layers and
    activations, as one C call (``native.diagonal_walk``: the Python calls per module cost more
    than the arithmetic of a batch of one); None where another module is walked or the loop
    does not serve. ``g``, ``s``: the loss's derivatives at the output, unscaled."""
    walked = [step for step, _ in tape.backward_steps()]
    if not walked or not all(type(step.rule) in (Linear, Activation) for step in walked):
        return None
    linear = [step for step in walked if type(step.rule) is Linear]
    weights = [cast(Tensor, step.module._parameters["weight"]) for step in linear]  # a Linear has one
    if not native.serves_walk(g, weights):  # before any activation's derivatives are computed
        return None
    plan: list[native.WalkLinear | native.WalkDerivatives | native.WalkActivation] = []
    next_weight = iter(weights)
    for step in walked:
        rule = step.rule
        if isinstance(rule, Linear):
            plan.append(native.WalkLinear(next(next_weight), step.ctx.x))
        elif isinstance(rule, Activation) and rule.native is not None:
            plan.append(native.WalkActivation(rule.native, step.ctx.y))
        else:
            plan.append(native.WalkDerivatives(*tape.activation_derivatives(step)))
    found = native.diagonal_walk(g, s, scale, plan, second=variant != "hesscale-gn")
    if found is None:
        return None
    grads: dict[Tensor, Tensor] = {}
    diags: dict[Tensor, Tensor] = {}
    for step, sums in zip(linear, found, strict=True):
        # a frozen weight's grad is None: ``accumulate`` skips parameters that require no gradient
        gradient: dict[str, Any] = {"weight": sums.grad, "bias": sums.g}
        diagonal: dict[str, Any] = {"weight": RankOne(sums.s, sums.x2), "bias": sums.s}  # RankOne: see Linear
        step.accumulate(grads, gradient)
        step.accumulate(diags, diagonal)
    return Backward(grads, diags)
