"""GGN-MC and KFAC diagonals: backpropagation of Monte-Carlo square-root factors of the output Hessian.

Per sample, M vectors S_m with E[S Sᵀ] = ∂²ℓ/∂z² (targets drawn from the model's predictive
distribution) pass backward through the Jacobians (activations contribute σ' only):

* ``ggn-mc`` (Dangel et al. 2020): diag ≈ Σ_n mean_m (Jᵀ S_nm)² per parameter, i.e. the squared
  gradients of the sampled losses;
* ``kfac`` (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions): the GGN block of a
  weight is approximated by A ⊗ B with A = mean_n Σ_t u u ᵀ (input patches u at positions t)
  and B = mean_n mean_t mean_m g gᵀ (backpropagated vectors g at the layer output); its diagonal
  is diag(B) ⊗ diag(A), times N for reduction='sum'. The bias is the weight of a constant input 1.
  For a single sample and a Linear layer this equals ``ggn-mc``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hsbench.curvature.tape import Tape, elementwise


def _kfac(step, v: Tensor, per_sample: bool) -> dict[str, Tensor]:
    module, n = step.module, v.shape[0]
    patches = step.rule.patches(module, step.ctx.x)  # (N, G, K, T)
    groups, positions = patches.shape[1], patches.shape[3]
    a = patches.square().sum(-1)  # (N, G, K)
    b = v.square().mean(1).reshape(n, groups, -1, positions).mean(-1)  # (N, G, C)
    if not per_sample:  # Kronecker factors are averaged over the batch before the product
        a, b = n * a.mean(0, keepdim=True), b.mean(0, keepdim=True)
    out = {"weight": (b.unsqueeze(-1) * a.unsqueeze(-2)).reshape(a.shape[0], *module.weight.shape)}
    if module.bias is not None:
        out["bias"] = (b * positions * (1 if per_sample else n)).reshape(a.shape[0], -1)
    return out if per_sample else {k: t[0] for k, t in out.items()}


def backpropagate(
    tape: Tape, method: str, samples: int, generator=None, per_sample: bool = False
) -> tuple[dict[Tensor, Tensor], dict[Tensor, Tensor]]:
    """Gradient and ``ggn-mc`` or ``kfac`` diagonal (``samples`` Monte-Carlo vectors per example),
    keyed by parameter. The gradient travels as one more vector beside the sampled ones."""
    z, target, loss = tape.output, tape.target, tape.loss
    scale = 1.0 if per_sample else tape.scale()  # gradients are linear in g, diagonals quadratic in S
    grad = scale * loss.grad(z, target).unsqueeze(1)
    factors = scale**0.5 * loss.mc_factor(z, target, samples, generator)
    v = torch.cat([grad, factors], 1).reshape(z.shape[0], samples + 1, *z.shape[1:])
    grads, diags = {}, {}
    for step, more in tape.backward_steps():
        if elementwise(step):
            v.mul_(step.rule.derivatives(step.module, step.ctx)[0].unsqueeze(1))  # v is this pass's own
            continue
        if step.has_parameters:
            step.accumulate(grads, step.rule.param_sums(step.module, step.ctx.x, v[:, 0], per_sample))
            if method == "kfac":
                step.accumulate(diags, _kfac(step, v[:, 1:], per_sample))
            else:
                step.accumulate(diags, step.rule.squared_param_sums(step.module, step.ctx.x, v[:, 1:], per_sample))
        if more:
            v = step.rule.vjp(step.module, step.ctx, v)
    return grads, diags
