"""Optimizers on Hessian-diagonal estimates, and one training-loop shape for all of them.

Every optimizer here knows the backward pass it needs::

    opt.zero_grad()
    loss = loss_fn(model(x), y)
    opt.backward(loss)   # gradient, plus the curvature the optimizer uses
    opt.step()

AdaHesScale, AdaHesScaleGN, AdaBL89, AdaGGNMC and AdaHessian share one Adam-style update
(Algorithm 2 of the paper, dividing as the workshop paper and the authors' code do)::

    m ← β1 m + (1 − β1) g          v ← β2 v + (1 − β2) d²
    W ← W − α m̂ ⊘ (√v̂ + ε)        (m̂, v̂ bias-corrected)

and differ only in the diagonal d. The curvature-based ones (all but AdaHessian) need the model
and the loss registered once with ``hsbench.curvature.extend``. ``trust_region`` turns on the
step-size scaling of Algorithm 3: the update U is scaled by η = min(1, √(2Δ / h)) with
h = Σ √v̂_hs ∘ U², v̂_hs the second moment of the HesScale diagonal; ``last_scale`` holds η.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor

from hsbench.curvature import diagonal_backprop, sampled_backprop
from hsbench.curvature.recording import tape_of


def check_hyperparameters(hyper: dict) -> None:
    """``ValueError`` naming the first invalid one of lr, betas, eps, weight_decay, trust_region in ``hyper``."""
    for name in ("lr", "eps", "weight_decay", "momentum"):
        if name in hyper and not hyper[name] >= 0:
            raise ValueError(f"{name} must be >= 0; got {hyper[name]}")
    for i, beta in enumerate(hyper.get("betas", ())):
        if not 0 <= beta < 1:
            raise ValueError(f"betas[{i}] must be in [0, 1); got {beta}")
    if hyper.get("trust_region") is not None and not hyper["trust_region"] > 0:
        raise ValueError(f"trust_region must be > 0; got {hyper['trust_region']}")


def _flushing_denormals() -> bool:
    """Whether the CPU treats subnormal floats as zero now (torch has no getter: probed)."""
    return float(torch.tensor([1e-39]) * 1.0) == 0.0


@contextmanager
def flush_denormals():
    """Treat subnormal floats (below 1.2e-38) as zero inside the curvature optimizers' backward and
    step, restoring the caller's mode after. Squared curvatures of deep or saturated networks
    underflow into that range, where CPUs compute many times slower; at that size they cannot
    change an update, whose denominator is √v̂ + ε with ε ≥ 0 and √v̂ < 1.1e-19."""
    previous = _flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous)


def needs_extend(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` backpropagates curvature from the recorded forward pass (then the
    model and loss must be registered with ``hsbench.curvature.extend``; the others run faster
    without the recording hooks)."""
    return isinstance(optimizer, (_HesScaleFamily, AdaGGNMC))


class DiagonalAdam(torch.optim.Optimizer):
    """The shared update. Subclasses implement ``curvature_backward(loss)``: set ``p.grad`` and
    return the diagonal d per parameter (a dict keyed by the parameter tensors).

    ``precondition`` is "curvature" (divide by √v̂ of d²) or "gradient" (Adam's √v̂ of g², used by
    Scaled Adam, where d only enters the step-size scaling)."""

    precondition = "curvature"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, trust_region=None):
        check_hyperparameters(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust_region=trust_region))
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.trust_region = trust_region
        self.last_scale = 1.0  # η of the last step (1 without step-size scaling)
        self._diagonal: dict[Tensor, Tensor] | None = None

    def _parameters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def curvature_backward(self, loss: Tensor) -> dict[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, loss: Tensor) -> None:
        """Backpropagate ``loss``: gradients into ``p.grad`` (accumulating) and the diagonal for ``step``."""
        with flush_denormals():
            self._diagonal = self.curvature_backward(loss)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._diagonal = None

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError(f"{type(self).__name__}.step takes no closure: call opt.backward(loss) before opt.step()")
        if self._diagonal is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() without curvature: call opt.backward(loss) (not loss.backward()) first"
            )
        with flush_denormals():
            moves, h = [], 0.0
            for group in self.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self._state(p)
                    t = state["step"]
                    grad = p.grad if group["weight_decay"] == 0 else p.grad.add(p, alpha=group["weight_decay"])
                    d = self._diagonal[p]
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(d, d, value=1 - beta2)
                    second = state["exp_avg_sq"]
                    if self.precondition == "gradient":
                        second = state["exp_avg_grad_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    correction2 = math.sqrt(1 - beta2**t)
                    denom = (second.sqrt() / correction2).add_(group["eps"])
                    step_size = group["lr"] / (1 - beta1**t)
                    if self.trust_region is None:
                        p.addcdiv_(state["exp_avg"], denom, value=-step_size)
                        continue
                    move = state["exp_avg"].div(denom).mul_(-step_size)  # −U
                    curvature = state["exp_avg_sq"].sqrt().div_(correction2)  # √v̂ of the HesScale diagonal
                    h += float(curvature.mul_(move.square()).sum())
                    moves.append((p, move))
            if self.trust_region is not None:
                self.last_scale = min(1.0, math.sqrt(2 * self.trust_region / h)) if h > 0 else 1.0
                for p, move in moves:
                    p.add_(move, alpha=self.last_scale)
        self._diagonal = None

    def _state(self, p: Tensor) -> dict:
        """The state of ``p`` with its step counter advanced (created at the first step)."""
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)  # second moment of d
            if self.precondition == "gradient":
                state["exp_avg_grad_sq"] = torch.zeros_like(p)
        state["step"] += 1
        return state


class _HesScaleFamily(DiagonalAdam):
    """d from one HesScale-style backward pass that also yields the gradient."""

    variant = "hesscale"

    def curvature_backward(self, loss):
        tape = tape_of(loss, self._parameters(), type(self).__name__)
        with torch.no_grad():
            grads, diags = diagonal_backprop.backpropagate(tape, self.variant)
        _accumulate_gradients(grads)
        return diags


def _accumulate_gradients(grads: dict[Tensor, Tensor]) -> None:
    for p, g in grads.items():
        p.grad = g if p.grad is None else p.grad + g


class AdaHesScale(_HesScaleFamily):
    """Adam-style optimizer on the HesScale diagonal (Elsayed et al. 2024, Algorithm 2)."""


class AdaHesScaleGN(_HesScaleFamily):
    """Adam-style optimizer on the HesScaleGN diagonal (no σ'' term)."""

    variant = "hesscale-gn"


class AdaBL89(_HesScaleFamily):
    """Adam-style optimizer on Becker & LeCun's (1989) diagonal."""

    variant = "bl89"


class AdaGGNMC(DiagonalAdam):
    """Adam-style optimizer on the Monte-Carlo GGN diagonal with one sample (Dangel et al. 2020)."""

    def curvature_backward(self, loss):
        tape = tape_of(loss, self._parameters(), type(self).__name__)
        with torch.no_grad():
            grads, diags = sampled_backprop.backpropagate(tape, "ggn-mc", samples=1)
        _accumulate_gradients(grads)
        return diags


class AdaHessian(DiagonalAdam):
    """AdaHessian (Yao et al. 2021, "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning", AAAI): d = |z ∘ Hz| for one Rademacher z per step (Hutchinson), averaged over the
    spatial kernel dimensions of convolution weights, Hessian power 1, and the authors' defaults
    lr = 0.15, betas = (0.9, 0.999), eps = 1e-4. Weight decay is L2 added to the gradient."""

    def __init__(self, params, lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0):
        super().__init__(params, lr, betas, eps, weight_decay)

    def curvature_backward(self, loss):
        params = self._parameters()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        probes = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        hz = torch.autograd.grad(grads, params, probes)
        _accumulate_gradients({p: g.detach() for p, g in zip(params, grads)})
        diags = {}
        for p, h in zip(params, hz):
            d = h.abs()  # |z ∘ Hz| with z = ±1
            if d.dim() >= 3:  # convolution kernel (out, in, *kernel): average over the kernel positions
                d = d.mean(tuple(range(2, d.dim())), keepdim=True).expand_as(d)
            diags[p] = d
        return diags


class ScaledAdaHesScale(AdaHesScale):
    """AdaHesScale with HesScale step-size scaling (Algorithm 3); ``trust_region`` Δ (paper: 1e-8)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, trust_region=1e-8):
        super().__init__(params, lr, betas, eps, weight_decay, trust_region)


class ScaledAdam(ScaledAdaHesScale):
    """Adam whose update is scaled as in Algorithm 3, h from the HesScale diagonal computed alongside."""

    precondition = "gradient"


class _PlainBackward:
    """First-order optimizers: ``backward`` is a plain ``loss.backward()``."""

    def backward(self, loss: Tensor) -> None:
        loss.backward()


class Adam(_PlainBackward, torch.optim.Adam):
    """``torch.optim.Adam`` (defaults unchanged) with the shared loop's ``backward``."""


class SGD(_PlainBackward, torch.optim.SGD):
    """``torch.optim.SGD`` with the shared loop's ``backward``."""


OPTIMIZERS = {
    "adahesscale": AdaHesScale,
    "adahesscale-gn": AdaHesScaleGN,
    "adabl89": AdaBL89,
    "adaggnmc": AdaGGNMC,
    "adahessian": AdaHessian,
    "adam": Adam,
    "sgd": SGD,
    "scaled-adahesscale": ScaledAdaHesScale,
    "scaled-adam": ScaledAdam,
}


def make(name: str, params, **hyper) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (see ``OPTIMIZERS``) on ``params`` with hyperparameters ``hyper``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    check_hyperparameters(hyper)
    try:
        return OPTIMIZERS[name](params, **hyper)
    except TypeError as error:  # an argument the optimizer does not take
        raise ValueError(f"{name}: {error}") from None
