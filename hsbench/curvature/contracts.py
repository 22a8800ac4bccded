"""The interfaces a module's curvature rule declares: what the three backward walks call on it.

Shapes: ``x`` is the module input (N, *in), ``y`` its output (N, *out). Backpropagated
quantities carry an extra vector dimension K after the batch dimension, ``v`` of shape
(N, K, *out), so one call serves a gradient (K = 1), K Monte-Carlo vectors, or the K = D_out rows
of a full Hessian. Parameter results are dicts keyed by the module's own parameter names
(``"weight"``, ``"log_std"``, ...); with ``per_sample`` every value has a leading batch dimension
(the quantity of each sample's own loss), otherwise it is summed over the batch.

Three contracts, one per kind of module:

* ``Elementwise``: y = σ(x) elementwise; ``derivatives`` gives σ'(x) and σ''(x).
* ``LinearMap``: parameter-free y = J x, J independent of the input values (up to a
  piecewise-constant selection such as max pooling); ``vjp`` and ``vjp_squared``.
* ``ParametrizedRule``: a ``LinearMap`` in its input that also has parameters (Linear, Conv,
  ``hsbench.losses.GaussianHead``); it adds the parameter side of every walk.

The contracts are abstract base classes: a rule that leaves one of their methods out cannot be
instantiated, so it fails when it is put into the rule table (``modules.RULES``), with a message
naming the missing methods, not in the middle of a backward pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TypeAlias

import torch
from torch import Tensor, nn


class Context:
    """What the backward pass needs from one module's forward: input, output and extras.

    Built from the input and output alone, so that a forward hook can record it. After an
    in-place module the input tensor holds the output; rules of such modules use ``y`` only."""

    __slots__ = ("extra", "x", "y")

    def __init__(self, x: Tensor, y: Tensor, extra=None):
        self.x, self.y, self.extra = x, y, extra


def fold(v: Tensor) -> Tensor:
    """(N, K, *shape) -> (N*K, *shape)."""
    return v.reshape(v.shape[0] * v.shape[1], *v.shape[2:])


def unfold(v: Tensor, n: int) -> Tensor:
    """(N*K, *shape) -> (N, K, *shape)."""
    return v.reshape(n, v.shape[0] // n, *v.shape[1:])


class Rule(ABC):
    """Base rule: checks a module's configuration and records its context."""

    def __new__(cls, *args, **kwargs):
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            declared = {m: next(b.__name__ for b in reversed(cls.__mro__) if m in b.__dict__) for m in missing}
            raise TypeError(
                f"curvature rule {cls.__name__} cannot be registered: it does not implement "
                + ", ".join(f"{m} (required by {declared[m]})" for m in missing)
            )
        return super().__new__(cls)

    def check(self, module: nn.Module) -> None:
        """Raise ``ValueError`` if this configuration of the module is not supported."""

    def extra(self, module: nn.Module, x: Tensor, y: Tensor):
        return None

    def prepare(self, module: nn.Module) -> None:
        """Configure ``module`` to hand extras to its forward hook (``hsbench.curvature.extend``)."""

    def split(self, module: nn.Module, output) -> tuple[Tensor, object]:
        """(output tensor, extra recorded by the forward or None) from what the module returned."""
        return output, None

    def context(self, module: nn.Module, x: Tensor, y: Tensor, recorded=None) -> Context:
        return Context(x, y, self.extra(module, x, y) if recorded is None else recorded)


class Elementwise(Rule):
    """y = σ(x) elementwise."""

    @abstractmethod
    def derivatives(self, module: nn.Module, ctx: Context) -> tuple[Tensor, Tensor]:
        """(σ'(x), σ''(x)), each of the output's shape (N, *out)."""


class LinearMap(Rule):
    """y = J x (+ b) with J independent of the input values; sample-wise (no mixing across N)."""

    @abstractmethod
    def vjp(self, module: nn.Module, ctx: Context, v: Tensor) -> Tensor:
        """Jᵀ v for each sample and vector: (N, K, *out) -> (N, K, *in)."""

    @abstractmethod
    def vjp_squared(self, module: nn.Module, ctx: Context, s: Tensor) -> Tensor:
        """Σ_o J_oi² s_o, the diagonal of Jᵀ diag(s) J: (N, K, *out) -> (N, K, *in)."""


ModuleRule: TypeAlias = Elementwise | LinearMap
"""The rule of a recorded module: elementwise or linear in its input (``ParametrizedRule`` is a
``LinearMap``); the walks tell the two apart with ``isinstance``."""


def autograd_vjp(module: nn.Module, ctx: Context, v: Tensor) -> Tensor:
    """Jᵀ v through autograd on a zero input, for parameter-free maps whose J does not depend on
    the input values."""
    n = v.shape[0]
    with torch.enable_grad():
        x0 = torch.zeros((fold(v).shape[0], *ctx.x.shape[1:]), dtype=v.dtype, device=v.device, requires_grad=True)
        (vjp,) = torch.autograd.grad(module(x0), x0, fold(v))
    return unfold(vjp, n)


class ParametrizedRule(LinearMap):
    """A module linear in its input that has parameters: the parameter side of the three walks.

    ``need_input`` says whether the walk still needs the quantity at the module's input (False at
    the first module with parameters); a rule may then skip computing it and return None."""

    # --- diagonal_backprop (HesScale, HesScaleGN, BL89)

    @abstractmethod
    def pullback(
        self, module: nn.Module, ctx: Context, g: Tensor, need_input: bool, per_sample: bool
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """For the gradient g = ∂ℓ/∂y (N, 1, *out): (Jᵀ g or None, the parameters' gradients)."""

    @abstractmethod
    def squared_pullback(
        self, module: nn.Module, ctx: Context, s: Tensor, need_input: bool, per_sample: bool
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """For a diagonal estimate s at the output (N, 1, *out): (Σ_o J_oi² s_o or None, for every
        parameter entry p the sum Σ_o (∂y_o/∂p)² s_o) — HesScale's Eq. 3–4 and 10–11."""

    # --- sampled_backprop (GGN-MC, KFAC)

    @abstractmethod
    def gradient(self, module: nn.Module, ctx: Context, g: Tensor, per_sample: bool) -> dict[str, Tensor]:
        """The parameters' gradients for g = ∂ℓ/∂y of shape (N, *out)."""

    @abstractmethod
    def squared_gradients(self, module: nn.Module, ctx: Context, v: Tensor, per_sample: bool) -> dict[str, Tensor]:
        """Σ_n mean_k (gradient of the vector v_nk)² for v (N, K, *out): the GGN-MC diagonal."""

    @abstractmethod
    def kfac(self, module: nn.Module, ctx: Context, v: Tensor, per_sample: bool) -> dict[str, Tensor]:
        """The diagonal of the KFAC approximation from the sampled vectors v (N, K, *out)."""

    # --- hessian_backprop (exact, GGN)

    @abstractmethod
    def hessian_diagonals(self, module: nn.Module, ctx: Context, h: Tensor, per_sample: bool) -> dict[str, Tensor]:
        """Exact parameter diagonals Σ_n diag(J_pᵀ H_n J_p) from full per-sample output Hessians
        h (N, D_out, D_out), J_p the Jacobian of the output w.r.t. the parameters."""
