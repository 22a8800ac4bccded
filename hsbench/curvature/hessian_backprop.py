"""Exact Hessian and GGN diagonals by backpropagating full Hessians w.r.t. module outputs.

Per sample, H_y = ∂²ℓ/∂y² (D × D) passes backward exactly (Dangel et al. 2020, HBP):

* through a linear map y = J x:   H_x = Jᵀ H_y J,
* through an activation y = σ(x): H_x = diag(σ') H_y diag(σ') + diag(σ'' ∘ g_y)  (GGN: no last term),
* at a parameter p of a module (``ParametrizedRule.hessian_diagonals``): diag(J_pᵀ H_y J_p), e.g.
  for a weight entry w of a linear map (∂y_t/∂w = u_t, the input patch) Σ_{t,t'} u_t H_y[t, t'] u_t',
  which for a Linear layer is diag(H_y) ⊗ x².

Cost grows with D², so this is meant for the small networks where the exact values are needed.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from hsbench.curvature.contracts import Elementwise, LinearMap, ParametrizedRule
from hsbench.curvature.tape import Step, Tape


def _sandwich(rule: LinearMap, step: Step, h: Tensor) -> Tensor:
    """Jᵀ H J for per-sample H (N, D_out, D_out) -> (N, D_in, D_in), J the Jacobian of ``step``'s linear map."""
    n, d_out = h.shape[:2]
    out_shape = step.ctx.y.shape[1:]
    hj = rule.vjp(step.module, step.ctx, h.reshape(n, d_out, *out_shape)).reshape(n, d_out, -1)
    d_in = hj.shape[2]
    return rule.vjp(step.module, step.ctx, hj.transpose(1, 2).reshape(n, d_in, *out_shape)).reshape(n, d_in, d_in)


def output_hessians(
    tape: Tape, curvature_of_activations: bool = True, scale: float = 1.0
) -> Iterator[tuple[Step, Tensor]]:
    """(step, per-sample Hessian of scale·ℓ_n w.r.t. the step's output, shape (N, D, D)), from the
    last module backward to the first module with parameters."""
    z = tape.output
    hessian, grad = tape.loss_derivatives("hessian", "grad")
    h = scale * hessian  # everything below is linear in (H, g) at the output
    g = (scale * grad).reshape(z.shape[0], 1, *z.shape[1:])
    for step, need_input in tape.backward_steps():
        yield step, h
        if not need_input:
            return
        rule = step.rule
        if isinstance(rule, Elementwise):
            d1, d2 = (d.reshape(d.shape[0], -1) for d in tape.activation_derivatives(step))
            h = d1.unsqueeze(2) * h * d1.unsqueeze(1)
            if curvature_of_activations:
                h = h + torch.diag_embed(d2 * g.reshape(d2.shape))
            g = g * d1.reshape(g.shape[0], 1, *g.shape[2:])
        else:
            h, g = _sandwich(rule, step, h), rule.vjp(step.module, step.ctx, g)


def backpropagate(tape: Tape, curvature_of_activations: bool = True, per_sample: bool = False) -> dict[Tensor, Tensor]:
    """Exact Hessian diagonal (``curvature_of_activations=True``) or exact GGN diagonal, keyed by parameter."""
    diags: dict[Tensor, Tensor] = {}
    for step, h in output_hessians(tape, curvature_of_activations, 1.0 if per_sample else tape.scale()):
        if isinstance(step.rule, ParametrizedRule) and step.has_parameters:
            step.accumulate(diags, step.rule.hessian_diagonals(step.module, step.ctx, h, per_sample))
    return diags
