"""Rules of torch's modules and the rule table: how first- and second-order information passes
backward through one module.

A rule knows one module type (matched by exact class, as in BackPACK: a subclass with its own
``forward`` is a different module) and implements one contract of ``contracts``:

* ``LinearMap`` (pooling, padding, flatten, dropout, identity): ``vjp(v) = Jᵀ v`` and
  ``vjp_squared(s) = Σ_o J_oi² s_o``, the diagonal of Jᵀ diag(s) J.
* ``ParametrizedRule`` (Linear, Conv, ``hsbench.losses.GaussianHead``): also the parameter side
  of every backward walk.
* ``Elementwise`` (activations): σ'(x) and σ''(x).

A new module type is one new rule (its own file for a module of hsbench's own, e.g.
``gaussian_head.py``) plus one line in ``RULES``.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hsbench import activations, losses
from hsbench.curvature import native
from hsbench.curvature.contracts import (
    Context,
    Elementwise,
    LinearMap,
    ModuleRule,
    ParametrizedRule,
    autograd_vjp,
    fold,
    unfold,
)
from hsbench.curvature.gaussian_head import GaussianHeadRule


class Selection(LinearMap):
    """Flatten, zero padding, identity: J selects or reshapes entries (0/1 entries)."""

    def vjp(self, module, ctx, v):
        return autograd_vjp(module, ctx, v)

    def vjp_squared(self, module, ctx, s):
        return autograd_vjp(module, ctx, s)


class AvgPool(LinearMap):
    """Average pooling: row o of J has the constant entry c_o on the inputs of window o."""

    def _row_weights(self, module: nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d, ctx: Context) -> Tensor:
        """c_o = (Σ_i J_oi) / (number of real, non-padding inputs in window o); shape (1, *out[1:])."""
        ones = ctx.x.new_ones((1, *ctx.x.shape[1:]))
        spatial = ones.dim() - 2
        # the window counts come from the 2d/3d pooling with divisor 1 (1d as 2d with height 1)
        pool = {1: F.avg_pool2d, 2: F.avg_pool2d, 3: F.avg_pool3d}[spatial]
        expand = (lambda t: (1, *t)) if spatial == 1 else (lambda t: t)
        as_tuple = lambda t: tuple(t) if isinstance(t, (tuple, list)) else (t,) * spatial  # noqa: E731
        counts = pool(
            ones.unsqueeze(2) if spatial == 1 else ones,
            expand(as_tuple(module.kernel_size)),
            expand(as_tuple(module.stride)),
            expand(as_tuple(module.padding)) if spatial > 1 else (0, as_tuple(module.padding)[0]),
            module.ceil_mode,
            module.count_include_pad,
            divisor_override=1,
        )
        counts = counts.squeeze(2) if spatial == 1 else counts
        return module(ones) / counts

    def vjp(self, module, ctx, v):
        return autograd_vjp(module, ctx, v)

    def vjp_squared(self, module, ctx, s):
        return self.vjp(module, ctx, s * self._row_weights(module, ctx).unsqueeze(1))


class MaxPool(LinearMap):
    """Max pooling: J selects, for every output, the input position of the window maximum."""

    _pool: ClassVar[dict[int, Callable]] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}

    def prepare(self, module):
        module.return_indices = True  # the forward hook records the indices and passes on the output

    def split(self, module, output):
        return output if isinstance(output, tuple) else (output, None)

    def extra(self, module, x, y):
        """Flat index of each output's maximum in its input plane (pooling again, with indices)."""
        return self._pool[x.dim() - 2](
            x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode, return_indices=True
        )[1]

    def vjp(self, module, ctx, v):
        n, k, c = v.shape[0], v.shape[1], v.shape[2]
        indices = ctx.extra.unsqueeze(1).expand(n, k, *ctx.extra.shape[1:]).reshape(n, k, c, -1)
        out = v.new_zeros((n, k, c, math.prod(ctx.x.shape[2:])))
        out.scatter_add_(3, indices, v.reshape(n, k, c, -1))
        return out.reshape(n, k, *ctx.x.shape[1:])

    def vjp_squared(self, module, ctx, s):
        return self.vjp(module, ctx, s)  # J has 0/1 entries


class Dropout(LinearMap):
    """Dropout: J = diag(mask / (1 - p)) in training mode, identity in evaluation mode."""

    def extra(self, module, x, y):
        """mask / (1 - p), read off the output: a zero output counts as dropped (its input can only
        matter if it is an exact zero that still carries gradient, e.g. an ELU or tanh at 0)."""
        if not (module.training and module.p > 0):
            return None
        return (y != 0).to(y.dtype) / (1 - module.p)

    def vjp(self, module, ctx, v):
        return v if ctx.extra is None else v * ctx.extra.unsqueeze(1)

    def vjp_squared(self, module, ctx, s):
        return s if ctx.extra is None else s * ctx.extra.square().unsqueeze(1)


_SQUARES: dict[tuple, Tensor] = {}


def squared_weight(weight: Tensor) -> Tensor:
    """W ∘ W, written into a buffer kept per shape, dtype and device and reused by every call: for
    a large layer, a fresh weight-sized tensor per layer and step costs more than the squaring
    itself (a new allocation's first writes fault its pages in). The result is only valid until
    the next call for a weight of the same kind: use it at once, keep no reference."""
    if weight.numel() < 1 << 15:  # small: allocation is cheap, and no buffer is kept
        return weight.square()
    key = (weight.shape, weight.dtype, weight.device)
    if key not in _SQUARES:
        _SQUARES[key] = torch.empty_like(weight, memory_format=torch.contiguous_format)
    return torch.square(weight, out=_SQUARES[key])


class WeightedMap(ParametrizedRule):
    """Linear and Conv: each output position t is W u_t (+ b), u_t the input patch it sees. The
    parameter side of every walk is written once here, from four layer-specific pieces."""

    @abstractmethod
    def param_sums(self, module: nn.Module, x: Tensor, v: Tensor, per_sample: bool) -> dict[str, Tensor]:
        """Σ_n Σ_t v_{n,t} ⊗ x_{n,t} per weight entry for v (N, *out): the gradient for v = ∂ℓ/∂y,
        HesScale's Eq. 3 / 11 for v = ŝ and x = x²."""

    @abstractmethod
    def input_and_param_sums(
        self, module: nn.Module, ctx: Context, v: Tensor, x: Tensor, weight: Tensor, need_input: bool, per_sample: bool
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """(v (N, 1, *out) pulled back to the input through ``weight`` if ``need_input`` else None,
        ``param_sums(x, v)``) in one call: the gradient for (g, x, W), Eq. 3–4 / 10–11 for (ŝ, x², W²)."""

    @abstractmethod
    def patches(self, module: nn.Module, x: Tensor) -> Tensor:
        """Input patches each output position sees: (N, G, K, T) for G groups, K entries, T positions."""

    @abstractmethod
    def output_blocks(self, module: nn.Module, h: Tensor) -> Tensor:
        """Full output Hessians (N, D, D) -> per output channel blocks (N, G, C/G, T, T)."""

    def pullback(self, module, ctx, g, need_input, per_sample):
        return self.input_and_param_sums(module, ctx, g, ctx.x, module.weight, need_input, per_sample)

    def squared_pullback(self, module, ctx, s, need_input, per_sample):
        # W² only where the input's ŝ is needed; else W stands in, its values unused (the first layer)
        weight = squared_weight(module.weight) if need_input else module.weight
        return self.input_and_param_sums(module, ctx, s, ctx.x.square(), weight, need_input, per_sample)

    def gradient(self, module, ctx, g, per_sample):
        return self.param_sums(module, ctx.x, g, per_sample)

    def kfac(self, module, ctx, v, per_sample):
        """Martens & Grosse 2015 (Grosse & Martens 2016 for convolutions): the GGN block of the weight
        is approximated by A ⊗ B with A = mean_n Σ_t u uᵀ (input patches u at positions t) and
        B = mean_n mean_t mean_k v vᵀ (the sampled vectors at the output); its diagonal is
        diag(B) ⊗ diag(A), times N for reduction='sum' (the batch is a sum of N samples). The bias
        is the weight of a constant input 1. Per sample, both factors are that sample's own."""
        n = v.shape[0]
        patches = self.patches(module, ctx.x)  # (N, G, K, T)
        groups, positions = patches.shape[1], patches.shape[3]
        a = patches.square().sum(-1)  # (N, G, K)
        b = v.square().mean(1).reshape(n, groups, -1, positions).mean(-1)  # (N, G, C)
        if not per_sample:  # Kronecker factors are averaged over the batch before the product
            a, b = n * a.mean(0, keepdim=True), b.mean(0, keepdim=True)
        out = {"weight": (b.unsqueeze(-1) * a.unsqueeze(-2)).reshape(a.shape[0], *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = (b * positions * (1 if per_sample else n)).reshape(a.shape[0], -1)
        return out if per_sample else {k: t[0] for k, t in out.items()}

    def hessian_diagonals(self, module, ctx, h, per_sample):
        """y_t is linear in w with ∂y_t/∂w = u_t: ∂²ℓ/∂w² = Σ_{t,t'} u_t H[t, t'] u_t'
        (for a Linear layer diag(H) ⊗ x²)."""
        patches = self.patches(module, ctx.x)  # (N, G, K, T)
        blocks = self.output_blocks(module, h)  # (N, G, C, T, T)
        weight = torch.einsum("ngkt,ngctu,ngku->ngck", patches, blocks, patches)
        out = {"weight": weight.reshape(h.shape[0], *module.weight.shape)}
        if module.bias is not None:
            out["bias"] = blocks.sum((-1, -2)).reshape(h.shape[0], -1)
        return out if per_sample else {k: v.sum(0) for k, v in out.items()}


class RankOne:
    """A weight-shaped sum that is one outer product column ⊗ row, kept as its factors: at batch
    size one, HesScale's weight diagonal ŝ ⊗ x² (Eq. 3) of a linear layer. ``materialize`` writes
    it out (the same numbers as the (out, 1) × (1, in) matrix product); a sum with anything, or a
    multiple, is written out first."""

    __slots__ = ("column", "row")

    def __init__(self, column: Tensor, row: Tensor):
        self.column, self.row = column, row  # (out,), (in,)

    def materialize(self) -> Tensor:
        return self.column.unsqueeze(1) * self.row.unsqueeze(0)

    def __add__(self, other: Tensor | RankOne) -> Tensor:
        return self.materialize() + (other.materialize() if isinstance(other, RankOne) else other)

    __radd__ = __add__

    def __rmul__(self, c: float) -> Tensor:
        return c * self.materialize()


class Linear(WeightedMap):
    """y = x Wᵀ + b for inputs (N, in)."""

    def factored_pullbacks(self, module, ctx, g, s, need_input, gradients):
        """``pullback`` (``vjp`` alone without ``gradients``) and ``squared_pullback`` for a batch of
        one sample (g, s: (1, 1, out)) in one call: (g's input part or None, gradient sums (empty
        without ``gradients``), ŝ's input part or None, diagonal sums). The weight's diagonal is
        left as its factors ŝ ⊗ x² (``RankOne``): the optimizers' update reads it without writing
        it out. The input parts g W and ŝ (W ∘ W) of a large weight come from one pass over it
        (``native.linear_pullbacks``)."""
        assert g.shape[0] == s.shape[0] == 1
        g_row, s_row = g.reshape(1, -1), s.reshape(1, -1)  # (1, out): one view each, not index after index
        s_entries = s_row.view(-1)
        diagonal = {"weight": RankOne(s_entries, ctx.x.reshape(-1).square())}
        if module.bias is not None:
            diagonal["bias"] = s_entries
        gradient = self.param_sums(module, ctx.x, g_row, False) if gradients else {}
        if not need_input:
            return None, gradient, None, diagonal
        fused = native.linear_pullbacks(module.weight, g_row.view(-1), s_entries)
        if fused is None:
            g_in, s_in = torch.mm(g_row, module.weight), torch.mm(s_row, squared_weight(module.weight))
        else:
            g_in, s_in = fused
        return g_in.view(1, 1, -1), gradient, s_in.view(1, 1, -1), diagonal

    def extra(self, module, x, y):
        if x.dim() != 2:
            raise ValueError(f"Linear layers need inputs of shape (N, features); got {tuple(x.shape)}")

    def vjp(self, module, ctx, v):
        return v @ module.weight

    def vjp_squared(self, module, ctx, s):
        return s @ squared_weight(module.weight)

    def param_sums(self, module, x, v, per_sample):
        out = {"weight": v.unsqueeze(2) * x.unsqueeze(1) if per_sample else torch.mm(v.T, x)}
        if module.bias is not None:
            out["bias"] = v if per_sample else v.sum(0)
        return out

    def input_and_param_sums(self, module, ctx, v, x, weight, need_input, per_sample):
        """Two-dimensional products (``torch.mm``, the same numbers as ``v @ weight`` on (N, 1, out)):
        at the sizes of reinforcement-learning policies, ``matmul``'s reshaping costs as much as the product."""
        v = v[:, 0]
        return (torch.mm(v, weight).unsqueeze(1) if need_input else None), self.param_sums(module, x, v, per_sample)

    def squared_gradients(self, module, ctx, v, per_sample):
        """Rank-one gradients square to v² ⊗ x²."""
        return self.param_sums(module, ctx.x.square(), v.square().mean(1), per_sample)

    def kfac(self, module, ctx, v, per_sample):
        """``WeightedMap.kfac`` with one input position, the same numbers in a third of the calls:
        diag(B) ⊗ diag(A), diag(A) = n · mean_n x², diag(B) = mean_n mean_k v²."""
        n, a, b = v.shape[0], ctx.x.square(), v.square().mean(1)  # (N, in), (N, out)
        if not per_sample:
            a, b = n * a.mean(0, keepdim=True), b.mean(0, keepdim=True)
        out = {"weight": b.unsqueeze(2) * a.unsqueeze(1)}
        if module.bias is not None:
            out["bias"] = b * (1 if per_sample else n)
        return out if per_sample else {k: t[0] for k, t in out.items()}

    def hessian_diagonals(self, module, ctx, h, per_sample):
        """diag(H) ⊗ x² (``WeightedMap.hessian_diagonals`` with one output position, as products)."""
        return self.param_sums(module, ctx.x.square(), torch.diagonal(h, dim1=1, dim2=2), per_sample)

    def patches(self, module, x):
        """(N, G=1, in, T=1)."""
        return x[:, None, :, None]

    def output_blocks(self, module, h):
        """(N, D, D) -> (N, G=1, out, T=1, T=1) (the contract's; Linear's own ``hessian_diagonals`` does not use it)."""
        return torch.diagonal(h, dim1=1, dim2=2)[:, None, :, None, None]


class Conv(WeightedMap):
    """Convolution in 1, 2 or 3 spatial dimensions with stride, padding, dilation and groups."""

    def check(self, module):
        if module.padding_mode != "zeros":
            raise ValueError(f"{type(module).__name__} with padding_mode={module.padding_mode!r} is not supported")
        self._padding(module)

    @staticmethod
    def _padding(module) -> tuple[int, ...]:
        if module.padding == "valid":
            return (0,) * len(module.kernel_size)
        if module.padding == "same":
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
            if any(t % 2 for t in total):
                raise ValueError("asymmetric padding='same' (even kernel) is not supported; pad with ZeroPad instead")
            return tuple(t // 2 for t in total)
        return module.padding

    def _args(self, module):
        return module.stride, self._padding(module), module.dilation, module.groups

    def _grad_input(self, module, weight, v, in_shape):
        dims = len(module.kernel_size)
        fn = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}[dims]
        n = v.shape[0]
        folded = fold(v)
        return unfold(fn((folded.shape[0], *in_shape[1:]), weight, folded, *self._args(module)), n)

    def vjp(self, module, ctx, v):
        return self._grad_input(module, module.weight, v, ctx.x.shape)

    def vjp_squared(self, module, ctx, s):
        return self._grad_input(module, squared_weight(module.weight), s, ctx.x.shape)  # Eq. 10

    def param_sums(self, module, x, v, per_sample):
        dims = len(module.kernel_size)
        fn = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}[dims]
        stride, padding, dilation, groups = self._args(module)
        shape = module.weight.shape
        if per_sample:  # each sample as its own group of a grouped convolution
            n = x.shape[0]
            weight = fn(
                x.reshape(1, -1, *x.shape[2:]),
                (n * shape[0], *shape[1:]),
                v.reshape(1, -1, *v.shape[2:]),
                stride,
                padding,
                dilation,
                groups * n,
            ).reshape(n, *shape)
        else:
            weight = fn(x, shape, v, stride, padding, dilation, groups)
        out = {"weight": weight}
        if module.bias is not None:
            out["bias"] = v.flatten(2).sum(2) if per_sample else v.flatten(2).sum((0, 2))
        return out

    def input_and_param_sums(self, module, ctx, v, x, weight, need_input, per_sample):
        """One ``convolution_backward`` call yields both parts for a batch; per sample, the weight
        part is a grouped convolution."""
        if per_sample:
            pulled = self._grad_input(module, weight, v, ctx.x.shape) if need_input else None
            return pulled, self.param_sums(module, x, v[:, 0], per_sample)
        stride, padding, dilation, groups = self._args(module)
        has_bias = module.bias is not None
        pulled, weight_part, bias_part = torch.ops.aten.convolution_backward(
            v[:, 0],
            x,
            weight,
            [weight.shape[0]] if has_bias else None,
            stride,
            padding,
            dilation,
            False,
            [0] * len(stride),
            groups,
            [need_input, True, has_bias],
        )
        sums = {"weight": weight_part, **({"bias": bias_part} if has_bias else {})}
        return (pulled.unsqueeze(1) if need_input else None), sums

    def squared_gradients(self, module, ctx, v, per_sample):
        """Through per-vector gradients."""
        n, k = v.shape[:2]
        grads = self.param_sums(module, ctx.x.repeat_interleave(k, 0), fold(v), per_sample=True)
        out = {name: g.square().reshape(n, k, *g.shape[1:]).mean(1) for name, g in grads.items()}
        return out if per_sample else {name: g.sum(0) for name, g in out.items()}

    def patches(self, module, x):
        """(N, G, C_in/G * prod(kernel), T)."""
        c_in, kernel = x.shape[1], module.kernel_size
        size = math.prod(kernel)
        one_hot = (
            torch.eye(size, dtype=x.dtype, device=x.device)
            .reshape(size, 1, *kernel)
            .repeat(c_in, 1, *([1] * len(kernel)))
        )
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(kernel)]
        stride, padding, dilation, _ = self._args(module)
        patches = conv(x, one_hot, None, stride, padding, dilation, c_in)  # (N, C_in * size, *out)
        return patches.reshape(x.shape[0], module.groups, (c_in // module.groups) * size, -1)

    def output_blocks(self, module, h):
        """(N, D, D), D = C_out·T -> (N, G, C_out/G, T, T)."""
        n, c = h.shape[0], module.out_channels
        t = h.shape[1] // c
        blocks = torch.diagonal(h.reshape(n, c, t, c, t), dim1=1, dim2=3).permute(0, 3, 1, 2)
        return blocks.reshape(n, module.groups, c // module.groups, t, t)


class Activation(Elementwise):
    """An activation given by a function ``(module, x, y) -> (σ'(x), σ''(x))``; ``native``: its
    name in ``native.WALK_ACTIVATIONS`` where the compiled walk computes the same numbers itself."""

    def __init__(
        self, derivatives: Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]], native: str | None = None
    ):
        self.derivatives_fn, self.native = derivatives, native

    def derivatives(self, module: nn.Module, ctx: Context) -> tuple[Tensor, Tensor]:
        return self.derivatives_fn(module, ctx.x, ctx.y)


# Derivatives are written with arithmetic on masks, not torch.where, which is many times slower
# on large CPU tensors.


def _relu(m, x, y):  # in-place capable: uses y (y > 0 exactly where x > 0)
    d1 = (y > 0).to(y.dtype)
    return d1, torch.zeros_like(d1)


def _leaky_relu(m, x, y):  # in-place capable: uses y
    if m.negative_slope <= 0:
        raise ValueError("LeakyReLU needs a positive negative_slope")
    d1 = (y > 0).to(y.dtype).mul_(1 - m.negative_slope).add_(m.negative_slope)
    return d1, torch.zeros_like(d1)


def _tanh(m, x, y):
    d1 = 1 - y.square()
    return d1, -2 * y * d1


def _sigmoid(m, x, y):
    d1 = y * (1 - y)
    return d1, d1 * (1 - 2 * y)


def _elu(m, x, y, scale=1.0, alpha=None):  # in-place capable: for x ≤ 0, σ' = σ'' = scale·α·eˣ = y + scale·α
    alpha = m.alpha if alpha is None else alpha
    positive = (y > 0).to(y.dtype)
    d2 = y.clamp(max=0).add_(scale * alpha).sub_(positive, alpha=scale * alpha)  # 0 where y > 0
    return torch.add(d2, positive, alpha=scale), d2


def _selu(m, x, y):
    return _elu(m, x, y, scale=1.0507009873554804934193349852946, alpha=1.6732632423543772848170429916717)


def _exp(m, x, y):  # σ' = σ'' = eˣ = y
    return y, y


def _softplus(m, x, y):
    z = m.beta * x
    sig = torch.sigmoid(z)
    smooth = (z <= m.threshold).to(x.dtype)  # above the threshold softplus is the identity
    d1 = (sig - 1).mul_(smooth).add_(1)
    return d1, (m.beta * sig * (1 - sig)).mul_(smooth)


RULES: dict[type[nn.Module], ModuleRule] = {
    nn.Linear: Linear(),
    nn.Conv1d: Conv(),
    nn.Conv2d: Conv(),
    nn.Conv3d: Conv(),
    nn.MaxPool1d: MaxPool(),
    nn.MaxPool2d: MaxPool(),
    nn.MaxPool3d: MaxPool(),
    nn.AvgPool1d: AvgPool(),
    nn.AvgPool2d: AvgPool(),
    nn.AvgPool3d: AvgPool(),
    nn.Flatten: Selection(),
    nn.ZeroPad1d: Selection(),
    nn.ZeroPad2d: Selection(),
    nn.ZeroPad3d: Selection(),
    nn.Identity: Selection(),
    nn.Dropout: Dropout(),
    nn.ReLU: Activation(_relu),
    nn.LeakyReLU: Activation(_leaky_relu),
    nn.Tanh: Activation(_tanh, native="tanh"),
    nn.Sigmoid: Activation(_sigmoid, native="sigmoid"),
    nn.ELU: Activation(_elu),
    nn.SELU: Activation(_selu),
    nn.Softplus: Activation(_softplus),
    activations.Exponential: Activation(_exp),
    losses.GaussianHead: GaussianHeadRule(),
}


def _rule_of(module: nn.Module, position: str) -> ModuleRule:
    rule = RULES[type(module)]
    if any(True for _ in module.parameters(recurse=False)) and not isinstance(rule, ParametrizedRule):
        raise ValueError(
            f"module {type(module).__name__} at position '{position}' has parameters, but its rule "
            f"{type(rule).__name__} does not implement ParametrizedRule"
        )
    rule.check(module)
    return rule


def layers(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module, ModuleRule]]:
    """The leaves of a (nested) ``nn.Sequential`` with their positions and rules, in forward order.

    Raises ``ValueError`` naming the class and position of the first unsupported module, or of a
    module used at two positions (its recorded contexts and exact diagonals would be wrong)."""
    if not prefix and type(model) in RULES:
        return [("", model, _rule_of(model, ""))]
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            "the curvature core needs an nn.Sequential (nesting allowed) of supported modules; "
            f"got {type(model).__name__}"
        )
    found: list[tuple[str, nn.Module, ModuleRule]] = []
    for name, child in model._modules.items():  # named_children() would skip a module's second use
        if child is None:
            continue
        position = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            found += layers(child, f"{position}.")
        elif type(child) in RULES:
            found.append((position, child, _rule_of(child, position)))
        else:
            raise ValueError(
                f"module {type(child).__name__} at position '{position}' is not supported "
                f"(supported: {', '.join(sorted(t.__name__ for t in RULES))})"
            )
    first_use: dict[int, str] = {}
    for position, module, _ in found:
        if first_use.setdefault(id(module), position) != position:
            raise ValueError(
                f"module {type(module).__name__} is used at positions '{first_use[id(module)]}' and "
                f"'{position}'; the curvature core needs a separate module at every position"
            )
    return found
