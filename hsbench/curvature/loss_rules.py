"""Per-loss rules: derivatives of each sample's loss ℓ_n w.r.t. the network output z_n.

The batch loss is ``scale · Σ_n ℓ_n`` with scale = 1/N for reduction='mean' and 1 for 'sum';
ℓ_n is the loss of sample n on its own (``loss_fn`` on a batch of one). Every quantity here is
per sample and unscaled, of shape (N, D) with D the size of one output:

* ``grad``: ∂ℓ_n/∂z_n;
* ``hessian_diagonal``: the exact diagonal of ∂²ℓ_n/∂z_n² (appendices B and C), linear in D;
* ``bl89_diagonal``: Becker & LeCun's output diagonal — the diagonal of the loss Hessian w.r.t.
  the distribution's probabilities pushed through the softmax with the diagonal of its Jacobian
  and of its second derivative (identical to the exact one for elementwise outputs);
* ``mc_factor`` (M samples): vectors S with E[S Sᵀ] equal to the output Hessian (for the
  Gaussian NLL, the Fisher), from targets sampled from the model's predictive distribution;
* ``hessian``: the full (N, D, D) output Hessian, used by the exact methods (through torch.func
  unless a rule writes it out).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import jacfwd, jacrev, vmap

from hsbench import losses


def _flat(z: Tensor) -> Tensor:
    return z.reshape(z.shape[0], -1)


def _log_prob_derivatives(
    z: Tensor, actions: Tensor, distribution: str, variance: str
) -> tuple[Tensor, Tensor, Callable[[], Tensor]]:
    """(∂ log π / ∂z, diagonal of ∂² log π / ∂z², both (N, D_out), and a function giving log π
    itself (N,) from the same intermediate results, the numbers of ``losses.log_prob``)."""
    if distribution == "categorical":
        q = torch.softmax(z, -1)
        g, h = nn.functional.one_hot(actions.long(), z.shape[-1]).to(z.dtype) - q, q.square() - q
        return g, h, lambda: losses.log_prob(z, actions, distribution)
    mean, var = losses.gaussian_split(z, variance)
    diff = actions - mean
    scaled = diff.square() / var  # (a − μ)² / σ²
    g_mean, h_mean = diff / var, -1 / var
    if variance == "raw":  # appendix B.2
        g_var, h_var = 0.5 * (scaled - 1) / var, (0.5 - scaled) / var.square()
    else:  # ν = log σ²
        g_var, h_var = 0.5 * (scaled - 1), -0.5 * scaled
    g, h = torch.cat([g_mean, g_var], -1), torch.cat([h_mean, h_var], -1)
    return g, h, lambda: losses.gaussian_log_prob(var, scaled)


class LossRule(ABC):
    """Derivatives of one loss module; subclasses implement ``grad`` and ``hessian_diagonal``."""

    def __init__(self, loss_fn: nn.Module):
        if getattr(loss_fn, "reduction", None) not in ("mean", "sum"):
            raise ValueError(f"{type(loss_fn).__name__} needs reduction 'mean' or 'sum'")
        self.loss_fn = loss_fn

    def scale(self, z: Tensor) -> float:
        return 1.0 / z.shape[0] if self.loss_fn.reduction == "mean" else 1.0

    @abstractmethod
    def grad(self, z: Tensor, target) -> Tensor:
        """∂ℓ_n/∂z_n, (N, D)."""

    @abstractmethod
    def hessian_diagonal(self, z: Tensor, target) -> Tensor:
        """The exact diagonal of ∂²ℓ_n/∂z_n², (N, D)."""

    def bl89_diagonal(self, z, target) -> Tensor:
        return self.hessian_diagonal(z, target)

    def grad_and_diagonal(self, z, target, diagonal: str) -> tuple[Tensor, Tensor]:
        """``(grad, <diagonal>)`` in one call, ``diagonal`` "hessian_diagonal" or "bl89_diagonal",
        for the diagonal walks (HesScale, HesScaleGN, BL89); rules whose derivatives share their
        work compute them together (cross-entropy both pairs, the policy losses the Hessian's)."""
        return self.grad(z, target), getattr(self, diagonal)(z, target)

    def mc_factor(self, z, target, samples: int, generator) -> Tensor:
        raise ValueError(
            f"{type(self.loss_fn).__name__} has no predictive distribution to sample from; Monte-Carlo GGN methods "
            "support CrossEntropyLoss, MSELoss and GaussianNLLLoss"
        )

    def hessian(self, z: Tensor, target) -> Tensor:
        def loss_of_one(z_n, t_n):
            batch_of_one = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), t_n)
            return self.loss_fn(z_n.unsqueeze(0), batch_of_one)

        return vmap(jacfwd(jacrev(loss_of_one)))(z, target).reshape(z.shape[0], z[0].numel(), z[0].numel())


class CrossEntropy(LossRule):
    """Softmax cross-entropy, class indices (N,) or class probabilities (N, C) as targets (appendix B.1)."""

    def __init__(self, loss_fn: nn.CrossEntropyLoss):
        super().__init__(loss_fn)
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0:
            raise ValueError("CrossEntropyLoss with class weights or label smoothing is not supported")

    def _check(self, z, target) -> None:
        if z.dim() != 2:
            raise ValueError(f"CrossEntropyLoss needs outputs of shape (N, classes); got {tuple(z.shape)}")
        if target.is_floating_point():
            return
        low, high = torch.stack(torch.aminmax(target)).tolist()  # one synchronization
        ignored = self.loss_fn.ignore_index
        if low <= ignored <= high and bool((target == ignored).any()):  # only then can a target equal it
            raise ValueError("CrossEntropyLoss targets equal to ignore_index are not supported")
        if low < 0 or high >= z.shape[1]:
            raise ValueError(f"CrossEntropyLoss class targets must lie in [0, {z.shape[1]}); got {low} to {high}")

    def _mass(self, z, target) -> Tensor | None:
        """P = Σ_c p_c per sample, (N, 1); None for class indices, where P = 1 and the products
        with it (exact) are left out, as is the one-hot p."""
        self._check(z, target)
        return target.sum(1, keepdim=True) if target.is_floating_point() else None

    @staticmethod
    def _rows(target) -> Tensor | None:
        """For class indices the target classes as (N, 1) int64 indices, where p is one (torch also
        takes other integer class indices, e.g. uint8); None for class probabilities."""
        return None if target.is_floating_point() else target.long().unsqueeze(1)

    @staticmethod
    def _grad(q: Tensor, mass: Tensor | None, rows: Tensor | None, target) -> Tensor:
        """P q − p from the softmax q; for class indices q with 1 subtracted at each target class."""
        if rows is None:
            assert mass is not None  # class probabilities
            return mass * q - target
        return q.scatter_add(1, rows, torch.full(rows.shape, -1.0, dtype=q.dtype, device=q.device))

    @staticmethod
    def _hessian_diagonal(q: Tensor, mass: Tensor | None) -> Tensor:
        """P (q − q²) from the softmax q."""
        return q - q.square() if mass is None else mass * (q - q.square())

    def grad(self, z, target):
        return self._grad(torch.softmax(z, 1), self._mass(z, target), self._rows(target), target)

    def hessian_diagonal(self, z, target):
        return self._hessian_diagonal(torch.softmax(z, 1), self._mass(z, target))

    @staticmethod
    def _bl89_diagonal(q: Tensor, rows: Tensor | None, target) -> Tensor:
        """p ∘ q ∘ (1 − q) from the softmax q; for class indices q_t (1 − q_t) at each target class t
        and 0 elsewhere, the numbers of the one-hot p without it (for finite q)."""
        if rows is None:
            return target * q * (1 - q)
        at_target = q.gather(1, rows)
        return torch.zeros_like(q).scatter_(1, rows, at_target * (1 - at_target))

    def grad_and_diagonal(self, z, target, diagonal):
        """Both from one softmax (and one conversion of class indices)."""
        q, mass = torch.softmax(z, 1), self._mass(z, target)
        rows = self._rows(target)
        d = self._bl89_diagonal(q, rows, target) if diagonal == "bl89_diagonal" else self._hessian_diagonal(q, mass)
        return self._grad(q, mass, rows, target), d

    def bl89_diagonal(self, z, target):
        """p ∘ q ∘ (1 − q): from ∂ℓ/∂q = −p/q and ∂²ℓ/∂q² = p/q² through the softmax's diagonal."""
        self._check(z, target)
        return self._bl89_diagonal(torch.softmax(z, 1), self._rows(target), target)

    def hessian(self, z, target):
        """P (diag(q) − q qᵀ)."""
        q, mass = torch.softmax(z, 1), self._mass(z, target)
        h = torch.diag_embed(q) - q.unsqueeze(2) * q.unsqueeze(1)
        return h if mass is None else mass.unsqueeze(2) * h

    def mc_factor(self, z, target, samples, generator):
        q = torch.softmax(z, 1)
        draws = torch.multinomial(q, samples, replacement=True, generator=generator)  # (N, M)
        drawn = q.new_zeros((*draws.shape, z.shape[1])).scatter_(2, draws.unsqueeze(2), 1.0)  # one-hot
        mass = self._mass(z, target)
        return q.unsqueeze(1) - drawn if mass is None else mass.sqrt().unsqueeze(2) * (q.unsqueeze(1) - drawn)


class MeanSquaredError(LossRule):
    """ℓ_n = c Σ_i (z_i − t_i)², c = 1/D for reduction='mean' (torch averages over all elements), else 1."""

    def _c(self, z):
        return 1.0 / z[0].numel() if self.loss_fn.reduction == "mean" else 1.0

    def grad(self, z, target):
        return 2 * self._c(z) * _flat(z - target)

    def hessian_diagonal(self, z, target):
        return torch.full_like(_flat(z), 2 * self._c(z))

    def mc_factor(self, z, target, samples, generator):
        noise = torch.randn((z.shape[0], samples, z[0].numel()), generator=generator, dtype=z.dtype, device=z.device)
        return (2 * self._c(z)) ** 0.5 * noise


class GaussianNLL(LossRule):
    """−log N(t; μ, σ²) with z = [μ, ν] (appendix B.2)."""

    def grad(self, z, target):
        return -_log_prob_derivatives(z, target, "gaussian", self.loss_fn.variance)[0]

    def hessian_diagonal(self, z, target):
        return -_log_prob_derivatives(z, target, "gaussian", self.loss_fn.variance)[1]

    def mc_factor(self, z, target, samples, generator):
        mean, var = losses.gaussian_split(z, self.loss_fn.variance)
        noise = torch.randn((z.shape[0], samples, mean.shape[1]), generator=generator, dtype=z.dtype, device=z.device)
        drawn = mean.unsqueeze(1) + var.sqrt().unsqueeze(1) * noise
        z_rep = z.unsqueeze(1).expand(-1, samples, -1).reshape(-1, z.shape[1])
        grad = -_log_prob_derivatives(z_rep, drawn.reshape(-1, mean.shape[1]), "gaussian", self.loss_fn.variance)[0]
        return grad.reshape(z.shape[0], samples, z.shape[1])


class PolicyGradient(LossRule):
    """ℓ = −A log π(a|z) (appendix C.1): the log-likelihood's derivatives times −A."""

    def _derivatives(self, z, target):
        actions, advantages = target
        g, h, _ = _log_prob_derivatives(z, actions, self.loss_fn.distribution, self.loss_fn.variance)
        return g, h, advantages.unsqueeze(1)

    def grad(self, z, target):
        g, _, a = self._derivatives(z, target)
        return -a * g

    def hessian_diagonal(self, z, target):
        _, h, a = self._derivatives(z, target)
        return -a * h

    def grad_and_diagonal(self, z, target, diagonal):
        if diagonal != "hessian_diagonal":
            return super().grad_and_diagonal(z, target, diagonal)
        g, h, a = self._derivatives(z, target)
        return -a * g, -a * h

    def bl89_diagonal(self, z, target):
        if self.loss_fn.distribution == "gaussian":
            return self.hessian_diagonal(z, target)
        actions, advantages = target  # A times the cross-entropy's p ∘ q ∘ (1 − q)
        q = torch.softmax(z, 1)
        return advantages.unsqueeze(1) * nn.functional.one_hot(actions.long(), z.shape[1]) * q * (1 - q)


class PPO(LossRule):
    """ℓ = −min(rA, clip(r)A) (appendix C.3): where the unclipped branch is active, ℓ = −A r with
    ∂r = r g and ∂²r = r (g² + h) on the diagonal (g, h: derivatives of log π); elsewhere 0."""

    def _derivatives(self, z, target):
        actions, advantages, old_log_probs = target
        g, h, log_prob = _log_prob_derivatives(z, actions, self.loss_fn.distribution, self.loss_fn.variance)
        r = (log_prob() - old_log_probs).exp()  # losses.PPOLoss.ratio
        eps = self.loss_fn.clip
        active = torch.where(advantages > 0, r <= 1 + eps, r >= 1 - eps)  # where A = 0, c below is 0 anyway
        return g, h, (-advantages * r * active).unsqueeze(1)  # last: ∂ℓ/∂r restricted to active samples

    def grad(self, z, target):
        g, _, c = self._derivatives(z, target)
        return c * g

    def hessian_diagonal(self, z, target):
        g, h, c = self._derivatives(z, target)
        return c * (g.square() + h)

    def grad_and_diagonal(self, z, target, diagonal):
        if diagonal != "hessian_diagonal":
            return super().grad_and_diagonal(z, target, diagonal)
        g, h, c = self._derivatives(z, target)
        return c * g, c * (g.square() + h)

    def bl89_diagonal(self, z, target):
        """Categorical: ∂ℓ/∂q_a = −A/π_old, ∂²ℓ/∂q_a² = 0, so only the softmax's second derivative
        q_a (1 − q_a)(1 − 2 q_a) contributes, at the taken action."""
        if self.loss_fn.distribution == "gaussian":
            return self.hessian_diagonal(z, target)
        _, _, c = self._derivatives(z, target)
        q = torch.softmax(z, 1)
        onehot = nn.functional.one_hot(target[0].long(), z.shape[1])
        return c * onehot * (1 - q) * (1 - 2 * q)


class Entropy(LossRule):
    """ℓ = H(π(·|z)), no target.

    Categorical, with q = softmax(z), l = log q and H = −Σ q l: ∂H/∂z_j = −q_j (l_j + H) and
    ∂²H/∂z_j² = −q_j (1 − q_j)(l_j + H + 1) + q_j² (l_j + H). Gaussian [μ, ν]: H = ½ Σ (1 + log 2π
    + log σ²) does not depend on μ; for ``variance="log"`` it is linear in ν (gradient ½, Hessian
    0), for ``"raw"`` the gradient is 1/(2ν) and the Hessian −1/(2ν²). There is no predictive
    distribution to draw targets from, so the Monte-Carlo methods raise (``mc_factor``)."""

    def _derivatives(self, z):
        if self.loss_fn.distribution == "categorical":
            log_q = torch.log_softmax(z, 1)
            q = log_q.exp()
            c = log_q - (q * log_q).sum(1, keepdim=True)  # l_j + H
            return -q * c, -q * (1 - q) * (c + 1) + q.square() * c
        mean, nu = z.chunk(2, dim=-1)
        if self.loss_fn.variance == "log":
            g_var, h_var = torch.full_like(nu, 0.5), torch.zeros_like(nu)
        else:
            g_var, h_var = 0.5 / nu, -0.5 / nu.square()
        return torch.cat([torch.zeros_like(mean), g_var], -1), torch.cat([torch.zeros_like(mean), h_var], -1)

    def grad(self, z, target):
        return self._derivatives(z)[0]

    def hessian_diagonal(self, z, target):
        return self._derivatives(z)[1]

    def bl89_diagonal(self, z, target):
        """Categorical: ∂H/∂q = −(log q + 1) and ∂²H/∂q² = −1/q through the softmax's diagonal,
        −q (1 − q)² − q (1 − q)(1 − 2q)(log q + 1)."""
        if self.loss_fn.distribution == "gaussian":
            return self.hessian_diagonal(z, target)
        log_q = torch.log_softmax(z, 1)
        q = log_q.exp()
        return -q * (1 - q).square() - q * (1 - q) * (1 - 2 * q) * (log_q + 1)

    def hessian(self, z, target):
        return vmap(jacfwd(jacrev(lambda z_n: self.loss_fn(z_n.unsqueeze(0)))))(z)


LOSS_RULES: dict[type[nn.Module], type[LossRule]] = {
    nn.CrossEntropyLoss: CrossEntropy,
    nn.MSELoss: MeanSquaredError,
    losses.GaussianNLLLoss: GaussianNLL,
    losses.PolicyGradientLoss: PolicyGradient,
    losses.PPOLoss: PPO,
    losses.Entropy: Entropy,
}


def loss_rule(loss_fn: nn.Module) -> LossRule:
    """The rule of ``loss_fn`` (matched by exact class); ``ValueError`` naming the supported losses."""
    if type(loss_fn) not in LOSS_RULES:
        names = ", ".join(t.__name__ for t in LOSS_RULES)
        raise ValueError(f"loss {type(loss_fn).__name__} is not supported by this method (supported: {names})")
    return LOSS_RULES[type(loss_fn)](loss_fn)
