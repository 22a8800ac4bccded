"""Rule of ``hsbench.losses.GaussianHead``: y = [x, 2·log_std] per sample (a ``ParametrizedRule``).

The output is linear in the input (J selects the first half: μ = x passes unchanged, so the
mean network gets the μ half of every backpropagated quantity) and affine in the parameter,
∂ν_ni/∂log_std_i = 2, like a bias whose input is the constant 2. Every parameter quantity is
therefore the ν half of the output quantity, times 2 for first-order and 4 for second-order ones,
summed over the batch (log_std is shared by all samples; the loss is a sum over samples, so the
Hessian w.r.t. log_std is the sum of each sample's, and its diagonal is exact for ``exact``,
``hesscale``, ``hesscale-gn`` and ``bl89`` alike: nothing lies between the head and the loss).

KFAC convention: the parameter is a bias with constant input 2, so A = 4 and B = mean_k v v ᵀ per
sample; with KFAC's bias treatment (factors of a bias are not averaged against inputs) its
diagonal equals the ``ggn-mc`` one, per sample and for the batch.
"""

from __future__ import annotations

from torch import Tensor

from hsbench.curvature.contracts import ParametrizedRule


def _mu(v: Tensor) -> Tensor:
    return v[..., : v.shape[-1] // 2]


def _nu(v: Tensor) -> Tensor:
    return v[..., v.shape[-1] // 2 :]


def _total(values: Tensor, per_sample: bool) -> dict[str, Tensor]:
    return {"log_std": values if per_sample else values.sum(0)}


class GaussianHeadRule(ParametrizedRule):
    def vjp(self, module, ctx, v):
        return _mu(v)

    def vjp_squared(self, module, ctx, s):
        return _mu(s)  # J has 0/1 entries

    def pullback(self, module, ctx, g, need_input, per_sample):
        return (_mu(g) if need_input else None), self.gradient(module, ctx, g[:, 0], per_sample)

    def squared_pullback(self, module, ctx, s, need_input, per_sample):
        return (_mu(s) if need_input else None), _total(4 * _nu(s[:, 0]), per_sample)

    def gradient(self, module, ctx, g, per_sample):
        return _total(2 * _nu(g), per_sample)

    def squared_gradients(self, module, ctx, v, per_sample):
        return _total(4 * _nu(v).square().mean(1), per_sample)

    def kfac(self, module, ctx, v, per_sample):
        return self.squared_gradients(module, ctx, v, per_sample)

    def hessian_diagonals(self, module, ctx, h, per_sample):
        return _total(4 * _nu(h.diagonal(dim1=1, dim2=2)), per_sample)
