"""GGN-MC and KFAC diagonals: backpropagation of Monte-Carlo square-root factors of the output Hessian.

Per sample, M vectors S_m with E[S Sᵀ] = ∂²ℓ/∂z² (targets drawn from the model's predictive
distribution) pass backward through the Jacobians (activations contribute σ' only):

* ``ggn-mc`` (Dangel et al. 2020): diag ≈ Σ_n mean_m (Jᵀ S_nm)² per parameter, i.e. the squared
  gradients of the sampled losses;
* ``kfac`` (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions): the GGN block of a
  weight is approximated by A ⊗ B with A = mean_n Σ_t u u ᵀ (input patches u at positions t)
  and B = mean_n mean_t mean_m g gᵀ (backpropagated vectors g at the layer output); its diagonal
  is diag(B) ⊗ diag(A), times N for reduction='sum' (``ParametrizedRule.kfac``). For a single
  sample and a Linear layer this equals ``ggn-mc``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hsbench.curvature.contracts import Elementwise, ParametrizedRule
from hsbench.curvature.tape import Backward, Tape


def backpropagate(
    tape: Tape, method: str, samples: int, generator=None, per_sample: bool = False, gradients: bool = True
) -> Backward:
    """Gradient and ``ggn-mc`` or ``kfac`` diagonal (``samples`` Monte-Carlo vectors per example),
    keyed by parameter. The gradient travels as one more vector (the first) beside the sampled
    ones; ``gradients=False``: the parameters' gradients are not computed (empty), and only the
    sampled vectors travel."""
    z, target, loss = tape.output, tape.target, tape.loss
    scale = 1.0 if per_sample else tape.scale()  # gradients are linear in g, diagonals quadratic in S
    v = scale**0.5 * loss.mc_factor(z, target, samples, generator)  # this pass's own: changed in place
    if gradients:
        v = torch.cat([scale * tape.loss_derivatives("grad")[0].unsqueeze(1), v], 1)
    sampled = slice(1, None) if gradients else slice(None)
    v = v.reshape(z.shape[0], v.shape[1], *z.shape[1:])
    grads: dict[Tensor, Tensor] = {}
    diags: dict[Tensor, Tensor] = {}
    for step, need_input in tape.backward_steps():
        rule, module, ctx = step.rule, step.module, step.ctx
        if isinstance(rule, Elementwise):
            v.mul_(tape.activation_derivatives(step)[0].unsqueeze(1))  # v is this pass's own
            continue
        if isinstance(rule, ParametrizedRule) and step.has_parameters:
            if gradients:
                step.accumulate(grads, rule.gradient(module, ctx, v[:, 0], per_sample))
            diagonal = rule.kfac if method == "kfac" else rule.squared_gradients
            step.accumulate(diags, diagonal(module, ctx, v[:, sampled], per_sample))
        if need_input:
            v = rule.vjp(module, ctx, v)
    return Backward(grads, diags)
