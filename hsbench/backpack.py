"""HesScale, HesScaleGN and BL89 as BackPACK extensions: the original HesScale package's interface.

    model, loss_fn = backpack.extend(model), backpack.extend(nn.CrossEntropyLoss())
    with backpack.backpack(HesScale(), DiagHessian()):
        loss_fn(model(x), y).backward()
    p.hesscale, p.diag_h    # per parameter, the parameter's shape

The extensions run hsbench's own per-module rules (``hsbench.curvature.modules.RULES``, and
``hsbench.curvature.loss_rules.LOSS_RULES`` for the losses) from BackPACK's backward hooks, so
``p.hesscale`` equals ``hsbench.curvature.diagonal("hesscale", ...)``: every module and loss that
hsbench's own walk supports, matched by exact class as in both packages. A module extension is an
adapter from BackPACK's hook arguments to a rule: hsbench's ``Context`` from ``module.input0`` and
``module.output``, the backpropagated ŝ (shape (N, 1, *out): the rules' vector dimension K = 1)
from BackPACK's saved quantities, and the gradient g = ∂L/∂y that an activation's σ'' g term needs
from the hook's ``g_out`` (what autograd computed; hsbench's walk carries its own g instead).

The loss's start (the exact output diagonal, or BL89's) is multiplied by the gradient that reaches
the loss, so ``(c * loss).backward()`` and sums of losses on extended loss modules give c times,
and the sum of, the diagonals, as ``hsbench.curvature.loss_diagonals`` does.

Not supported: a module outside hsbench's rule table (``NotImplementedError`` naming it and the
supported ones, raised during ``backward``), per-sample results, BackPACK's ``subsampling``.
In-place activations (``ReLU(inplace=True)``) cannot be used with BackPACK at all: torch refuses
in-place operations on the outputs of modules with full backward hooks.
"""

from __future__ import annotations

from backpack import backpack, disable
from backpack.extensions.backprop_extension import FAIL_ERROR, BackpropExtension
from backpack.extensions.module_extension import ModuleExtension
from torch import Tensor, nn

from hsbench.curvature.contracts import Context, Elementwise, LinearMap, ParametrizedRule, Rule
from hsbench.curvature.loss_rules import LOSS_RULES, loss_rule
from hsbench.curvature.modules import RULES

__all__ = ["BL89", "HesScale", "HesScaleGN"]


class _DiagonalExtension(BackpropExtension):
    """Backpropagates ŝ, the diagonal estimate at each module's output; ``variant`` is one of
    ``hsbench.curvature.diagonal_backprop.VARIANTS``."""

    variant: str

    def __init__(self, savefield: str):
        extensions: dict[type, ModuleExtension] = {cls: _rule_extension(rule) for cls, rule in RULES.items()}
        extensions.update({cls: _LossExtension() for cls in LOSS_RULES})
        self._supported = tuple(extensions)
        super().__init__(savefield=savefield, module_exts=extensions, fail_mode=FAIL_ERROR)

    def __call__(self, module: nn.Module, g_inp: tuple[Tensor, ...], g_out: tuple[Tensor, ...]) -> None:
        if type(module) not in self._supported:
            names = ", ".join(sorted(cls.__name__ for cls in self._supported))
            raise NotImplementedError(
                f"{type(self).__name__} does not support module {type(module).__name__} (supported: {names})"
            )
        super().__call__(module, g_inp, g_out)

    def expects_backpropagation_quantities(self) -> bool:
        return True

    def accumulate_backpropagated_quantities(self, existing: Tensor, other: Tensor) -> Tensor:
        return existing + other  # a tensor used twice: ŝ is linear in what reaches it


class HesScale(_DiagonalExtension):
    """HesScale (Elsayed & Mahmood): ``p.hesscale``."""

    variant = "hesscale"

    def __init__(self, savefield: str = "hesscale"):
        super().__init__(savefield)


class HesScaleGN(_DiagonalExtension):
    """HesScale without the activations' σ'' g term (Gauss-Newton): ``p.hesscale_gn``."""

    variant = "hesscale-gn"

    def __init__(self, savefield: str = "hesscale_gn"):
        super().__init__(savefield)


class BL89(_DiagonalExtension):
    """Becker & LeCun 1989 (HesScale's rule applied to the output nonlinearity too): ``p.bl89``."""

    variant = "bl89"

    def __init__(self, savefield: str = "bl89"):
        super().__init__(savefield)


class _LossExtension(ModuleExtension):
    """The start of the walk: ŝ at the network output z = ``module.input0`` from the loss's rule,
    target ``module.input1`` (absent for ``hsbench.losses.Entropy``)."""

    def __call__(self, ext: _DiagonalExtension, module, g_inp, g_out) -> None:
        rule = loss_rule(module)
        z = module.input0.detach()
        start = rule.bl89_diagonal if ext.variant == "bl89" else rule.hessian_diagonal
        weight = g_out[0].detach() * rule.scale(z)  # the loss's factor in what backward() differentiates
        s = (weight * start(z, getattr(module, "input1", None))).reshape(z.shape[0], 1, *z.shape[1:])
        ext.saved_quantities.save_quantity(module.input0.data_ptr(), s, ext.accumulate_backpropagated_quantities)


class _RuleExtension(ModuleExtension):
    """A module with a rule of ``hsbench.curvature.modules.RULES``: ŝ at its output to ŝ at its
    input, and the parameters' diagonals into ``p.<savefield>``.

    One rule call yields the input's and the parameters' quantities together, so this implements
    ``ModuleExtension.__call__`` itself rather than BackPACK's one method per parameter."""

    def __init__(self, rule: Rule):
        super().__init__()
        self.rule = rule

    def pull(
        self, ext: _DiagonalExtension, module: nn.Module, ctx: Context, s: Tensor, g: Tensor, need_input: bool
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """(ŝ at the input or None, {local parameter name: diagonal}) from ŝ and g = ∂L/∂y, both (N, 1, *out)."""
        raise NotImplementedError

    def __call__(self, ext: _DiagonalExtension, module, g_inp, g_out) -> None:
        self.rule.check(module)
        s = ext.saved_quantities.retrieve_quantity(module.output.data_ptr(), delete_old=True)
        if s is None:
            raise RuntimeError(
                f"{type(ext).__name__}: nothing reached module {type(module).__name__} from the loss; "
                "compute the loss with a loss module passed through backpack.extend"
            )
        x, y, g = module.input0.detach(), module.output.detach(), g_out[0].detach().unsqueeze(1)
        need_input = module.input0.requires_grad
        # Some rules run the module itself (contracts.autograd_vjp): its hooks must not re-enter
        # BackPACK (no extension runs, no input or output is stored or deleted).
        with disable(), backpack(retain_graph=True):
            s_in, diagonals = self.pull(ext, module, self.rule.context(module, x, y), s, g, need_input)
        for name, value in diagonals.items():
            parameter = getattr(module, name)
            if parameter.requires_grad:
                setattr(parameter, ext.savefield, value)
        if need_input:
            ext.saved_quantities.save_quantity(module.input0.data_ptr(), s_in, ext.accumulate_backpropagated_quantities)


class _ElementwiseExtension(_RuleExtension):
    """ŝ_x = σ'² ŝ_y + σ'' g_y (HesScaleGN: without σ'' g_y), as in ``diagonal_backprop``."""

    def pull(self, ext, module, ctx, s, g, need_input):
        d1, d2 = (d.unsqueeze(1) for d in self.rule.derivatives(module, ctx))
        s_in = d1.square() * s
        return (s_in if ext.variant == "hesscale-gn" else s_in + d2 * g), {}


class _LinearMapExtension(_RuleExtension):
    """ŝ_x = Σ_o J_oi² ŝ_o (``LinearMap.vjp_squared``)."""

    def pull(self, ext, module, ctx, s, g, need_input):
        return self.rule.vjp_squared(module, ctx, s), {}


class _ParametrizedExtension(_RuleExtension):
    """Input and parameter sides in one ``ParametrizedRule.squared_pullback`` call (Eq. 3–4, 10–11)."""

    def pull(self, ext, module, ctx, s, g, need_input):
        return self.rule.squared_pullback(module, ctx, s, need_input, per_sample=False)


def _rule_extension(rule: Rule) -> _RuleExtension:
    if isinstance(rule, Elementwise):
        return _ElementwiseExtension(rule)
    if isinstance(rule, ParametrizedRule):
        return _ParametrizedExtension(rule)
    if isinstance(rule, LinearMap):
        return _LinearMapExtension(rule)
    raise TypeError(f"rule {type(rule).__name__} implements none of Elementwise, LinearMap, ParametrizedRule")
