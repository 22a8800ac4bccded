"""Optimizers on Hessian-diagonal estimates, and one training step for all of them.

Every optimizer here (``make(name, params)``, names in ``OPTIMIZERS``) knows the backward pass
it needs, so one training step, :func:`train_step`, serves them all::

    opt.zero_grad()
    loss = loss_fn(model(x), y)
    opt.backward(loss)  # gradient, plus the curvature the optimizer uses
    opt.step()

AdaHesScale, AdaHesScaleGN, AdaBL89, AdaGGNMC and AdaHessian share one Adam-style update
(Algorithm 2 of the paper, dividing as the workshop paper and the authors' code do)::

    m ← β1 m + (1 − β1) g          v ← β2 v + (1 − β2) d²
    W ← W − α m̂ ⊘ (√v̂ + ε)        (m̂, v̂ bias-corrected)

and differ only in the diagonal d. The curvature-based ones (``needs_recording``: all but
AdaHessian, Adam and SGD) need the model and the loss registered once with
``hsbench.curvature.extend``; their loss may also be a weighted sum of such losses, e.g.
``pg_loss - 0.01 * entropy + 0.5 * v_loss`` over an actor and a critic network, whose gradient
and diagonal are the weighted sums of the terms' (``hsbench.curvature.loss_diagonals``).

Step-size scaling (Algorithm 3; ``scaled-adahesscale``, ``scaled-adam``, or ``trust_region=Δ``):
the update U is scaled by η = min(1, √(2Δ / h)) with h = Σ √v̂_hs ∘ U², v̂_hs the second moment
of the HesScale diagonal, bias-corrected as the paper writes it (``trust_region_bias_correction=
True``, the default) or uncorrected as in the authors' reinforcement-learning code (``False``);
``last_scale`` holds η. η is one number per optimizer: the sum h runs over all of the
optimizer's parameters. The paper scales actor and critic separately, which is one optimizer per
network; one optimizer over both networks scales them with one common η.

Divergence: ``backward`` on a non-finite loss, and a ``step`` that would write a non-finite
parameter or state, raise :class:`Diverged` before changing any parameter or optimizer state
(Adam and SGD: ``step`` checks that the gradients are finite, then runs torch's update).

Speed: the update's arithmetic is written once in Python (``_new_state``) and once in C for the
CPU (``native.UpdatePasses``; the tests hold the two equal). Each step runs it in two passes, a
read-only one for the sums that the divergence check and η need, then one in place: on the CPU
in the C loop (``_NativeUpdate``, where a C compiler is found; with several torch threads only
for parameters below ``_CompiledUpdate.MIN_SIZE`` entries), and elsewhere for parameters of that
size or more as two loops compiled by torch.compile (``_CompiledUpdate``). Where neither serves
(no compiler, another device) a parameter is stepped op by op, those below ``_JOIN_BELOW``
entries joined into one vector so that each operation runs once over all of them (``_Batch``).
As in torch's optimizers, the state of joined, compiled and C-stepped parameters is updated in
place: copy a ``state_dict`` to keep it (``load_state_dict`` copies what it loads).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import Tensor, nn

from hsbench.curvature import loss_diagonals, native
from hsbench.curvature.modules import RankOne


class Diverged(FloatingPointError):
    """A non-finite loss, or a step that would write non-finite numbers; nothing was changed."""


class Optimizer(Protocol):
    """What every optimizer of ``OPTIMIZERS`` offers (``make``'s return type)."""

    needs_recording: ClassVar[bool]
    """Whether ``backward`` reads the forward pass recorded by ``hsbench.curvature.extend``."""

    def __init__(self, params: Any, **hyper: Any) -> None: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def backward(self, loss: Tensor) -> None:
        """Backpropagate ``loss``: gradients into ``p.grad``, and whatever ``step`` needs."""

    def step(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def train_step(opt: Optimizer, model: nn.Module, loss_fn: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """One training step of ``opt`` on the batch (x, y); returns the loss (detached).
    Raises :class:`Diverged` (nothing changed) on a non-finite loss or update."""
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    opt.backward(loss)
    opt.step()
    return loss.detach()


def check_finite_loss(loss: Tensor, who: str) -> None:
    """:class:`Diverged` naming ``who`` if ``loss`` has a non-finite entry (a scalar: one ``item()``)."""
    finite = math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss).all())
    if not finite:
        raise Diverged(f"{who}.backward: the loss is {loss.detach().cpu().tolist()}")


def _all_finite(tensors: list[Tensor], sums: list[float] | None = None) -> bool:
    """Whether every entry of every tensor is finite, from sums that together cover every entry
    once (``sums``: one per tensor or one over all; else computed here, one per tensor, with one
    synchronization): a sum is finite whenever every entry is finite, and not finite when one is
    not, unless finite entries overflow it; only then are the entries looked at. One pass
    without writes, where ``torch.isfinite(t).all()`` costs several and a boolean tensor."""
    if not tensors:
        return True
    if sums is None:
        sums = torch.stack([t.sum() for t in tensors]).tolist()
    return all(math.isfinite(s) for s in sums) or all(bool(torch.isfinite(t).all()) for t in tensors)


def _finiteness_witnesses(new: dict, move: Tensor, h_covers_move: bool) -> list[Tensor]:
    """Tensors that are all finite exactly when the new state ``new`` and ``move`` are.

    The new first moment m needs no check of its own: −U = −α m̂ ⊘ (√v̂ + ε) has a non-finite
    entry wherever m has one (an infinite numerator over any denominator, or NaN). A second moment
    v does (an infinite v only zeroes the move). With step-size scaling the term Σ √v̂ ∘ U² of h
    is non-finite wherever U or the HesScale second moment is, so it already witnesses both."""
    tensors = [new["exp_avg_grad_sq"]] if "exp_avg_grad_sq" in new else []  # Scaled Adam's preconditioner
    if not h_covers_move:
        tensors += [move, new["exp_avg_sq"]]
    return tensors


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


_SUBNORMAL = 5e-324  # the smallest positive double; a module global, never inlined: CPython folds
# a product of literals at compile time, which would make the probe below constant


def _flushing_denormals() -> bool:
    """Whether the CPU treats subnormal floats as zero now (torch has no getter: probed). Python's
    own float product runs on the thread's floating-point unit in the mode that
    ``torch.set_flush_denormal`` sets (x86's MXCSR, AArch64's FPCR): a tenth of a tensor op's cost."""
    return _SUBNORMAL * 1.0 == 0.0


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


class _Form(NamedTuple):
    """Which form of the shared update an optimizer computes."""

    gradient: bool  # precondition by Adam's second moment w of g² (Scaled Adam), else by v of d²
    trust_region: bool  # step-size scaling (Algorithm 3): h's term is computed
    corrected: bool  # h from the bias-corrected v̂ (else from v)


class _Item(NamedTuple):
    """One parameter's part of a step: its state before the step (zeros on its first), the step
    number t, the gradient (weight decay added), the diagonal d and the coefficients
    k = (1 − β1, β2, 1 − β2, √(1 − β2^t), ε, −α / (1 − β1^t))."""

    param: Tensor
    old: dict[str, Any]
    t: int
    grad: Tensor
    diagonal: Tensor | RankOne
    k: tuple[float, ...]


_JOIN_BELOW = 1 << 15
"""Parameters of fewer entries are joined into batches; larger ones are each a ``_Batch`` of their own."""


class _Batch(NamedTuple):
    """Parameters stepped as one (``_Item``s with the same coefficients k, dtype and device): the
    update runs each operation once over their entries joined into one vector. Elementwise
    operations give every entry the same number as parameter by parameter, and h's term is still
    summed per parameter, so results are equal bit for bit on the CPU; the Python calls are a
    fraction (a 2×64 network has six parameters). The moments are views of one flat buffer per
    moment, joined on a first step, or where the state entries are no such views (after
    ``load_state_dict``, which copies what it loads, or ``copy.deepcopy``), and kept in the state,
    so that per step only g and d are joined.

    A parameter of ``_JOIN_BELOW`` entries or more is a batch of its own, stepped without copies
    (its new moments become its state): joined, its copies (g, d and the moments, once per step)
    would cost more than the calls they save."""

    items: list[_Item]
    sizes: list[int]  # entries per parameter
    moments: dict[str, Tensor]  # per state name (exp_avg, …): the flat moment, shape (Σ sizes,)
    joined: bool  # whether the state entries are views of ``moments`` already (a batch of one replaces them)

    @staticmethod
    def group(items: list[_Item], names: tuple[str, ...]) -> list[_Batch]:
        """``items`` in batches of equal (k, dtype, device) (large ones alone), in order of first
        appearance; ``names``: the moments the update reads."""
        groups: dict[object, list[_Item]] = {}
        for item in items:
            key = (item.k, item.param.dtype, item.param.device) if item.param.numel() < _JOIN_BELOW else id(item)
            groups.setdefault(key, []).append(item)
        return [_Batch.of(group, names) for group in groups.values()]

    @staticmethod
    def of(items: list[_Item], names: tuple[str, ...]) -> _Batch:
        """The batch of ``items``, its moments the state's flat buffers where they are kept, else joined anew."""
        sizes = [item.param.numel() for item in items]
        if len(items) == 1:  # flat views of its own moments
            return _Batch(items, sizes, {name: items[0].old[name].reshape(-1) for name in names}, False)
        bases = {name: _view_base([item.old[name] for item in items], sizes) for name in names}
        moments = {name: base for name, base in bases.items() if base is not None}
        if len(moments) == len(names):
            return _Batch(items, sizes, moments, True)
        return _Batch(items, sizes, {name: _joined([item.old[name] for item in items]) for name in names}, False)

    def update(self, form: _Form) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
        """``_new_state`` of the joined entries (flat, shape (Σ sizes,))."""
        diagonals = [d.materialize() if isinstance(d, RankOne) else d for d in (item.diagonal for item in self.items)]
        grad, d, m = _joined([item.grad for item in self.items]), _joined(diagonals), self.moments
        return _new_state(m["exp_avg"], m["exp_avg_sq"], m.get("exp_avg_grad_sq"), grad, d, self.items[0].k, form, True)

    def commit(self, state: dict, update: tuple[dict[str, Tensor], Tensor, Tensor | None], scale: float) -> None:
        """Write the new moments into ``state`` (the optimizer's) and move each parameter by scale · (−U)."""
        new, move, _ = update
        if len(self.items) == 1:  # its new moments become its state
            (item,) = self.items
            state[item.param].update({name: new[name].view_as(item.param) for name in self.moments}, step=item.t)
            item.param.add_(move.view_as(item.param), alpha=scale)
            return
        for name, moment in self.moments.items():
            moment.copy_(new[name])
        params = [item.param for item in self.items]
        moves = [part.view_as(p) for part, p in zip(move.split(self.sizes), params, strict=True)]
        torch._foreach_add_(params, moves, alpha=scale)
        views = {} if self.joined else {name: m.split(self.sizes) for name, m in self.moments.items()}
        for i, item in enumerate(self.items):
            entry = state[item.param]
            entry.update({name: parts[i].view_as(item.param) for name, parts in views.items()}, step=item.t)


def _view_base(entries: list[Tensor], sizes: list[int]) -> Tensor | None:
    """The vector of which ``entries`` are consecutive views, ``sizes`` entries each, or None."""
    base = entries[0]._base
    if base is None or base.dim() != 1 or base.numel() != sum(sizes):
        return None
    offset = base.storage_offset()
    for entry, size in zip(entries, sizes, strict=True):
        if entry._base is not base or entry.storage_offset() != offset or not entry.is_contiguous():
            return None
        offset += size
    return base


def _joined(tensors: list[Tensor]) -> Tensor:
    """The tensors' entries as one vector (a view of a single contiguous tensor, else a new one)."""
    return tensors[0].reshape(-1) if len(tensors) == 1 else torch.cat([t.reshape(-1) for t in tensors])


def _total(values: list[float]) -> float:
    """The exact sum of finite ``values`` (``math.fsum``), inf where it overflows."""
    try:
        return math.fsum(values)
    except OverflowError:
        return math.inf


def _sums(batches: list[_Batch], updates: list[tuple], form: _Form) -> tuple[list[Tensor], int, list[Tensor]]:
    """The sums the step checks, as 0-d tensors: the batches' Σ of h's term per parameter (none
    without step-size scaling), then one Σ per finiteness witness; how many of them are h's; the
    witnesses themselves (``_finiteness_witnesses``)."""
    h_terms = [(batch, h_term) for batch, (_, _, h_term) in zip(batches, updates, strict=True) if h_term is not None]
    h_sums = [part.sum() for batch, h_term in h_terms for part in h_term.split(batch.sizes)]
    witnesses = [w for new, move, _ in updates for w in _finiteness_witnesses(new, move, form.trust_region)]
    return h_sums + [w.sum() for w in witnesses], len(h_sums), witnesses


def _new_state(
    m: Tensor,
    v: Tensor,
    w: Tensor | None,
    grad: Tensor,
    d: Tensor,
    k: tuple[float, ...],
    form: _Form,
    reuse_root: bool = False,
) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """The shared update of one parameter, out of place: (new moments, move −U, h's term √v̂ ∘ U²
    or None without step-size scaling). The update's arithmetic in Python (in C for the CPU:
    ``native.UpdatePasses``): the eager step calls it with ``reuse_root``, and ``_CompiledUpdate``
    compiles it without."""
    new = {"exp_avg": m.lerp(grad, k[0]), "exp_avg_sq": v.mul(k[1]).addcmul_(d, d, value=k[2])}
    second = new["exp_avg_sq"]
    if form.gradient:
        assert w is not None
        second = new["exp_avg_grad_sq"] = w.mul(k[1]).addcmul_(grad, grad, value=k[2])
    root = second.sqrt().div_(k[3])  # √v̂ of the preconditioner
    move = new["exp_avg"].div(root.add(k[4])).mul_(k[5])  # −U
    if not form.trust_region:
        return new, move, None
    # √v̂ (or √v) of the HesScale diagonal, for AdaHesScale the preconditioner's root again (same
    # operations, same values): reused op by op (one pass fewer), computed anew when compiled (a
    # reused root would make the fused loop store it into a weight-sized buffer)
    if reuse_root and form.corrected and not form.gradient:
        return new, move, root * move.square()
    curvature = new["exp_avg_sq"].sqrt()
    if form.corrected:
        curvature.div_(k[3])
    return new, move, curvature.mul_(move.square())


Diagonal = Tensor | tuple[Tensor, Tensor]
"""d, or the factors (column (R, 1), row (1, C)) of a rank-one d, for the compiled functions."""


def _check_sums(m: Tensor, v: Tensor, w: Tensor | None, grad: Tensor, d: Diagonal, k: tuple, form: _Form) -> Tensor:
    """One parameter's sums for the step, computed without writing anything: Σ of h's term (0
    without step-size scaling), then Σ of each finiteness witness (``_finiteness_witnesses``)."""
    d = d if isinstance(d, Tensor) else d[0] * d[1]
    new, move, h_term = _new_state(m, v, w, grad, d, k, form)
    witnesses = _finiteness_witnesses(new, move, h_term is not None)
    return torch.stack([move.new_zeros(()) if h_term is None else h_term.sum()] + [t.sum() for t in witnesses])


def _apply(
    p: Tensor, m: Tensor, v: Tensor, w: Tensor | None, grad: Tensor, d: Diagonal, k: tuple, form: _Form, scale: float
) -> None:
    """Write one parameter's new moments and move it by scale · (−U), in place."""
    d = d if isinstance(d, Tensor) else d[0] * d[1]
    new, move, _ = _new_state(m, v, w, grad, d, k, form._replace(trust_region=False))
    m.copy_(new["exp_avg"])
    v.copy_(new["exp_avg_sq"])
    if w is not None:
        w.copy_(new["exp_avg_grad_sq"])
    p.add_(move.mul_(scale))  # not alpha=scale: torch.compile would specialize on (recompile for) every scale


class _CompiledUpdate:
    """The update of large parameters as two fused loops (``torch.compile``): a read-only pass
    for the sums that the divergence check and the step-size scaling need (``_check_sums``), then,
    once all are known, an in-place pass that recomputes the new state and writes it with the move
    (``_apply``). Op by op the update makes about twenty passes over weight-sized tensors and
    allocates every intermediate; fused it reads m, v (Scaled Adam: w), g, d twice and writes
    m, v (w), p once.

    Compiled once per dtype, form of the update and kind of d (vector or rank-one), for any shape
    (``dynamic=True``; the step's numbers are symbolic floats, so no recompilation per step). Where
    no compiler works (no C++ compiler, an unsupported device or Python), ``suppress_errors`` makes
    torch run the same two functions eagerly, which gives the same results. It serves parameters
    of ``MIN_SIZE`` entries or more that the C loop does not (``_NativeUpdate``: another device,
    several threads, no C compiler): a compiled call costs about 20 µs of Python, and on figure
    8(a)'s networks the compiled path measured slower than the eager one up to 131,072 entries
    (512 × 256)."""

    MIN_SIZE = 1 << 18
    RECOMPILE_LIMIT = 64  # graphs per function (dtypes × forms × vector or rank-one d × shapes); torch's is 8

    def __init__(self) -> None:
        self._sums: Callable[..., Tensor] | None = None  # compiled on first use
        self._apply: Callable[..., None] | None = None

    def applies(self, item: _Item) -> bool:
        old = item.old
        written = (item.param, old["exp_avg"], old["exp_avg_sq"], old.get("exp_avg_grad_sq"))
        return item.param.numel() >= self.MIN_SIZE and all(t is None or t.is_contiguous() for t in written)

    @staticmethod
    def flat(item: _Item) -> tuple:
        """(p, m, v, w, g, d) of ``item`` as vectors (views of those written), or with a ``RankOne`` d
        as matrices and d's factors: two compiled functions serve every shape."""
        old, d = item.old, item.diagonal
        tensors = (item.param, old["exp_avg"], old["exp_avg_sq"], old.get("exp_avg_grad_sq"), item.grad)
        if isinstance(d, RankOne):
            shape = (d.column.shape[0], d.row.shape[0])
            factors = (d.column.reshape(-1, 1).clone(), d.row.reshape(1, -1).clone())  # clones: not views, fewer guards
            return (*(None if t is None else t.reshape(shape) for t in tensors), factors)
        return (*(None if t is None else t.reshape(-1) for t in tensors), d.reshape(-1))

    def sums(self, items: list[_Item], flats: list[tuple], form: _Form) -> list[Tensor]:
        """``_check_sums`` of each item, from its ``flat`` tensors."""
        if self._sums is None:
            self._sums = torch.compile(_check_sums, dynamic=True)
        fn = self._sums
        with torch._dynamo.config.patch(suppress_errors=True, recompile_limit=self.RECOMPILE_LIMIT):
            return [fn(*flat[1:], item.k, form) for item, flat in zip(items, flats, strict=True)]

    def apply(self, items: list[_Item], flats: list[tuple], scale: float, form: _Form) -> None:
        """``_apply`` to each item, through its ``flat`` tensors (views of those written)."""
        if self._apply is None:
            self._apply = torch.compile(_apply, dynamic=True)
        fn = self._apply
        with torch._dynamo.config.patch(suppress_errors=True, recompile_limit=self.RECOMPILE_LIMIT):
            for item, flat in zip(items, flats, strict=True):
                fn(*flat, item.k, form, scale)


class _NativeUpdate:
    """The update of parameters on the CPU as the C loop of ``native.UpdatePasses``, in the two
    passes of ``_CompiledUpdate`` (the sums, then the writes once all are known), each one call
    for all of them: op by op the update makes about twenty passes over each parameter (or over
    the small ones joined, ``_Batch``), allocating every intermediate, and costs tens of µs of
    Python calls per step however small the network; the loop reads each tensor once per pass.
    It is single-threaded: with several torch threads, parameters of ``_CompiledUpdate.MIN_SIZE``
    entries or more take the compiled loops, which run in parallel (with one thread the C loop
    measured faster: figure 8(b) at 8 layers, AdaHesScale's step 2.5 ms against 3.5 ms). The moves
    between the passes take a buffer as large as the parameters, kept by the optimizer. Its
    numbers are the eager step's to float rounding: the moments bit for bit (on this VM), the
    moves to the rounding of torch's vectorized square root (not always correctly rounded) and h
    to the order of its sums."""

    def applies(self, item: _Item) -> bool:
        old, d = item.old, item.diagonal
        tensors = (item.param, old["exp_avg"], old["exp_avg_sq"], old.get("exp_avg_grad_sq"), item.grad)
        return (
            item.param.numel() > 0
            and (item.param.numel() < _CompiledUpdate.MIN_SIZE or torch.get_num_threads() == 1)
            and item.param.device.type == "cpu"
            and all(t is None or (t.is_contiguous() and t.dtype == item.param.dtype) for t in tensors)
            and (
                d.column.dtype == item.param.dtype
                if isinstance(d, RankOne)
                else d.is_contiguous() and d.dtype == item.param.dtype
            )
            and native.available(item.param.dtype)
        )

    @staticmethod
    def passes(items: list[_Item], form: _Form, buffers: dict[torch.dtype, Tensor]) -> list[native.UpdatePasses]:
        """The items' passes, one per dtype, their moves written into ``buffers`` (the optimizer's,
        one per dtype, grown here where too small)."""
        groups: dict[torch.dtype, list[native.Update]] = {}
        for item in items:
            old, d = item.old, item.diagonal
            moments = (old["exp_avg"], old["exp_avg_sq"], old.get("exp_avg_grad_sq"))
            diagonal = (d.column, d.row) if isinstance(d, RankOne) else d
            update = native.Update(item.param, moments, item.grad, diagonal, item.k)
            groups.setdefault(item.param.dtype, []).append(update)
        for dtype, updates in groups.items():
            size = sum(u.param.numel() for u in updates)
            if dtype not in buffers or buffers[dtype].numel() < size:
                buffers[dtype] = torch.empty(size, dtype=dtype)
        return [native.UpdatePasses(updates, form.gradient, buffers[dtype]) for dtype, updates in groups.items()]

    @staticmethod
    def sums(passes: list[native.UpdatePasses], form: _Form) -> list[list[float]]:
        """Per item, ``_check_sums``'s row: Σ of h's term (0 without step-size scaling), then Σ of each
        finiteness witness."""
        rows = []
        for p in passes:
            for h, w, move, v in p.sums(form.trust_region, form.corrected):
                rows.append([h] + [w] * form.gradient + [move, v] * (not form.trust_region))
        return rows


_FUSED = _CompiledUpdate()
_NATIVE = _NativeUpdate()


class DiagonalAdam(torch.optim.Optimizer):
    """The shared update. Subclasses implement ``curvature_backward(loss)``: set ``p.grad`` and
    return the diagonal d per parameter (a dict keyed by the parameter tensors).

    ``precondition`` is "curvature" (divide by √v̂ of d²) or "gradient" (Adam's √v̂ of g², used by
    Scaled Adam, where d only enters the step-size scaling)."""

    precondition = "curvature"
    needs_recording: ClassVar[bool] = False

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        trust_region=None,
        trust_region_bias_correction=True,
    ) -> None:
        hyper = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "trust_region": trust_region}
        check_hyperparameters(hyper)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.trust_region = trust_region
        self.trust_region_bias_correction = trust_region_bias_correction
        self.last_scale = 1.0  # η of the last step (1 without step-size scaling)
        self._diagonal: dict[Tensor, Tensor] | None = None
        self._moves: dict[torch.dtype, Tensor] = {}  # ``_NativeUpdate``'s buffers

    def __getstate__(self) -> dict[str, Any]:
        """torch's (defaults, state, param_groups) and the step-size scaling's settings and η, for
        ``copy.deepcopy`` and pickle."""
        names = ("trust_region", "trust_region_bias_correction", "last_scale")
        return {**super().__getstate__(), **{name: getattr(self, name) for name in names}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict
        self.__dict__.setdefault("_diagonal", None)
        self.__dict__.setdefault("_moves", {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, with the state's tensors copied: the step writes moments in place, and torch
        keeps the given tensors, which would share them with the state's source (the copies are
        joined anew on the next step)."""
        super().load_state_dict(state_dict)
        for entry in self.state.values():
            entry.update({name: value.clone() for name, value in entry.items() if isinstance(value, Tensor)})

    def _parameters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def curvature_backward(self, loss: Tensor) -> dict[Tensor, Tensor]:
        raise NotImplementedError

    def backward(self, loss: Tensor) -> None:
        """Backpropagate ``loss``: gradients into ``p.grad`` (accumulating) and the diagonal for ``step``."""
        check_finite_loss(loss, type(self).__name__)
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
            items = self._items(self._diagonal)
            in_c = [_NATIVE.applies(item) for item in items]  # not named native: that is the module
            own = [item for item, c in zip(items, in_c, strict=True) if c]
            compiled = [item for item, c in zip(items, in_c, strict=True) if not c and _FUSED.applies(item)]
            chosen = {id(item) for item in compiled + own}
            small = self._batches([item for item in items if id(item) not in chosen])
            if items and not (chosen and self._fused_step(compiled, own, small)):
                self._eager_step(small + self._batches(compiled + own))
        self._diagonal = None

    def _items(self, diagonal: dict[Tensor, Tensor]) -> list[_Item]:
        """One ``_Item`` per parameter with a gradient, its state as it was before this step."""
        items = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            coefficients: dict[int, tuple[float, ...]] = {}  # per step number t: the group's k
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                old = self.state.get(p) or self._initial_state(p)  # .get: adds no entry yet
                t = int(old.get("step", 0)) + 1
                if t not in coefficients:
                    k = (1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**t), group["eps"])
                    coefficients[t] = (*k, -group["lr"] / (1 - beta1**t))
                grad = grad if group["weight_decay"] == 0 else grad.add(p, alpha=group["weight_decay"])
                items.append(_Item(p, old, t, grad, diagonal[p], coefficients[t]))
        return items

    def _batches(self, items: list[_Item]) -> list[_Batch]:
        return _Batch.group(items, self._moment_names())

    def _eager_step(self, batches: list[_Batch]) -> None:
        """The step op by op: every new state and move out of place, written only once all are finite."""
        form = self._form()
        updates = [batch.update(form) for batch in batches]
        ours, n_h, witnesses = _sums(batches, updates, form)
        sums = torch.stack(ours).tolist()  # one synchronization
        h = _total(sums[:n_h])
        if not (math.isfinite(h) and _all_finite(witnesses, sums[n_h:])):
            raise Diverged(f"{type(self).__name__}.step: the update is not finite; nothing was changed")
        scale = self._scale(h)
        for batch, update in zip(batches, updates, strict=True):
            batch.commit(self.state, update, scale)

    def _fused_step(self, compiled: list[_Item], own: list[_Item], small: list[_Batch]) -> bool:
        """The step with the update of ``own`` in C (``_NativeUpdate``), of ``compiled`` by
        torch.compile (``_CompiledUpdate``) and of the rest op by op in batches (``_Batch``). False,
        with nothing changed, where a sum is not finite (an overflowing sum of finite numbers
        included): the eager step then checks entry by entry."""
        form = self._form()
        updates = [batch.update(form) for batch in small]
        ours, n_h, _ = _sums(small, updates, form)
        flats = [_FUSED.flat(item) for item in compiled]  # made once, for both passes
        # per compiled or C-stepped item a row: Σ of h's term, then Σ of each finiteness witness
        # (dynamo's configuration patch costs tens of µs: only where something is compiled)
        stacked = ([torch.stack(ours)] if ours else []) + (_FUSED.sums(compiled, flats, form) if compiled else [])
        sums = torch.cat(stacked).tolist() if stacked else []  # one synchronization
        ours_sums, rest = sums[: len(ours)], sums[len(ours) :]
        width = len(rest) // len(compiled) if compiled else 0
        rows = [rest[i * width : (i + 1) * width] for i in range(len(compiled))]
        passes = _NATIVE.passes(own, form, self._moves)
        rows += _NATIVE.sums(passes, form)
        if not all(math.isfinite(s) for s in ours_sums) or not all(math.isfinite(s) for row in rows for s in row):
            return False
        h = _total(ours_sums[:n_h] + [row[0] for row in rows])
        if not math.isfinite(h):
            return False
        scale = self._scale(h)
        for item in compiled + own:  # updated in place: on a parameter's first step, its initial zeros become its state
            self.state[item.param].update({k: v for k, v in item.old.items() if k != "step"}, step=item.t)
        if compiled:
            _FUSED.apply(compiled, flats, scale, form)
        for p in passes:
            p.apply(scale)
        for batch, update in zip(small, updates, strict=True):
            batch.commit(self.state, update, scale)
        return True

    def _form(self) -> _Form:
        return _Form(self.precondition == "gradient", self.trust_region is not None, self.trust_region_bias_correction)

    def _scale(self, h: float) -> float:
        """η = min(1, √(2Δ / h)) (1 without step-size scaling); recorded as ``last_scale``."""
        scale = 1.0
        if self.trust_region is not None and h > 0:
            scale = min(1.0, math.sqrt(2 * self.trust_region / h))
        self.last_scale = scale
        return scale

    def _moment_names(self) -> tuple[str, ...]:
        """The state entries the update reads and writes (others a state may hold are kept as they are)."""
        return ("exp_avg", "exp_avg_sq") + (("exp_avg_grad_sq",) if self.precondition == "gradient" else ())

    def _initial_state(self, p: Tensor) -> dict[str, Tensor]:
        """The zero moments of ``p`` before its first step."""
        return {name: torch.zeros_like(p) for name in self._moment_names()}


class _HesScaleFamily(DiagonalAdam):
    """d from one HesScale-style backward pass that also yields the gradient."""

    variant = "hesscale"
    needs_recording: ClassVar[bool] = True

    def curvature_backward(self, loss):
        who = type(self).__name__
        found = loss_diagonals(loss, self.variant, parameters=self._parameters(), who=who, factored=True)
        _accumulate_gradients(found.gradients)
        return found.diagonals


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

    needs_recording: ClassVar[bool] = True

    def curvature_backward(self, loss):
        found = loss_diagonals(loss, "ggn-mc", parameters=self._parameters(), who=type(self).__name__)
        _accumulate_gradients(found.gradients)
        return found.diagonals


class AdaHessian(DiagonalAdam):
    """AdaHessian (Yao et al. 2021, "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
    Learning", AAAI): d = |z ∘ Hz| for one Rademacher z per step (Hutchinson), averaged over the
    spatial kernel dimensions of convolution weights, Hessian power 1, and the authors' defaults
    lr = 0.15, betas = (0.9, 0.999), eps = 1e-4. Weight decay is L2 added to the gradient."""

    def __init__(self, params, lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0):
        super().__init__(params, lr, betas, eps, weight_decay)

    def curvature_backward(self, loss):
        params = self._parameters()
        if not params:  # nothing to train (a frozen network)
            return {}
        grads = torch.autograd.grad(loss, params, create_graph=True)
        probes = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        hz = torch.autograd.grad(grads, params, probes)
        _accumulate_gradients({p: g.detach() for p, g in zip(params, grads, strict=True)})
        diags = {}
        for p, h in zip(params, hz, strict=True):
            d = h.abs()  # |z ∘ Hz| with z = ±1
            if d.dim() >= 3:  # convolution kernel (out, in, *kernel): average over the kernel positions
                d = d.mean(tuple(range(2, d.dim())), keepdim=True).expand_as(d)
            diags[p] = d
        return diags


class ScaledAdaHesScale(AdaHesScale):
    """AdaHesScale with HesScale step-size scaling (Algorithm 3); ``trust_region`` Δ (paper: 1e-8)."""

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        trust_region=1e-8,
        trust_region_bias_correction=True,
    ):
        super().__init__(params, lr, betas, eps, weight_decay, trust_region, trust_region_bias_correction)


class ScaledAdam(ScaledAdaHesScale):
    """Adam whose update is scaled as in Algorithm 3, h from the HesScale diagonal computed alongside."""

    precondition = "gradient"


class _PlainBackward:
    """First-order optimizers: ``backward`` is a plain ``loss.backward()``; ``step`` is torch's,
    once the gradients are checked finite."""

    needs_recording: ClassVar[bool] = False

    def backward(self, loss: Tensor) -> None:
        check_finite_loss(loss, type(self).__name__)
        loss.backward()

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not _all_finite(grads):
            raise Diverged(f"{type(self).__name__}.step: a gradient is not finite; nothing was changed")
        return super().step(closure)


class Adam(_PlainBackward, torch.optim.Adam):
    """``torch.optim.Adam`` (defaults unchanged) with the shared loop's ``backward``."""


class SGD(_PlainBackward, torch.optim.SGD):
    """``torch.optim.SGD`` with the shared loop's ``backward``."""


OPTIMIZERS: dict[str, type[Optimizer]] = {
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


def make(name: str, params, **hyper) -> Optimizer:
    """The optimizer called ``name`` (see ``OPTIMIZERS``) on ``params`` with hyperparameters ``hyper``."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZERS)}")
    check_hyperparameters(hyper)
    try:
        return OPTIMIZERS[name](params, **hyper)
    except TypeError as error:  # an argument the optimizer does not take
        raise ValueError(f"{name}: {error}") from None
