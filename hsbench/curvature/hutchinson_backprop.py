"""Hutchinson's z ∘ (H z) by Hessian-vector products on the recorded forward pass (Pearlmutter 1994).

For networks of Linear layers and elementwise activations (after any parameter-free modules
before the first layer), the directional derivative along the probes z of every quantity of the
forward and backward pass, written with a dot (Pearlmutter's R-operator), passes through the
recorded steps, for M probes at once (shape (N, M, ...)):

* forward, a Linear layer y = W h + b:   ẏ = W ḣ + Ż_W h + Ż_b   (ḣ = 0 at the first layer),
  an activation y = σ(x):               ẏ = σ'(x) ẋ,
* at the network output z:              ġ_z = H_ℓ ż (H_ℓ the loss Hessian w.r.t. z),
* backward, an activation:              ġ_x = σ'(x) ġ_y + σ''(x) ẋ g_y,
  a Linear layer:                       ġ_h = Wᵀ ġ_y + Ż_Wᵀ g_y,
* at a Linear layer's parameters:       (H z)_W = Σ_n ġ_y hᵀ + g_y ḣᵀ,   (H z)_b = Σ_n ġ_y.

The estimate mean_m z_m ∘ (H z_m) of a weight is then contracted over the probes without forming
H z_m: Σ_m Z_m ∘ (ġ_m hᵀ) = (Σ_m Z_m ∘ ġ_m 1ᵀ) ∘ 1 hᵀ, one batched product that reads the probes
once. Autograd's Hessian-vector products (``autograd_estimators``) write H z for every probe and
read it again, several passes over M × (number of parameters) entries; this walk makes two per
example (the forward product Ż_W h and the contraction), plus, at a layer whose input still
needs ġ, one for Ż_Wᵀ g_y and one for the g_y ḣᵀ term (a temporary of M weights). The
results are those of autograd up to float rounding (same probes, other order of summation).

At the first layer ḣ = 0 and no earlier step needs ġ_h, so (H z)_W = Σ_n ġ_n h_nᵀ: a column i
of the weight where every input h_ni is 0 has (H z)_W = 0 and so a zero estimate, and adds
nothing to Ż_W h. On images with a blank background (MNIST: 81 % of the pixels exactly 0) most
columns are such; ``needed_blocks`` names the others in blocks of 8 columns (one random byte of
the probes each), the probes are unpacked there only (``autograd_estimators.rademacher_sets``,
the same draws), and the walk's products at that weight read those columns only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hsbench.curvature import native
from hsbench.curvature.contracts import Elementwise
from hsbench.curvature.tape import Step, Tape


def supported(tape: Tape) -> bool:
    """Whether the walk handles ``tape``: from the first module with parameters on, only
    ``nn.Linear`` layers (2-d inputs) and elementwise activations."""
    walked = [step for step, _ in tape.backward_steps()]
    return bool(walked) and all(
        isinstance(step.rule, Elementwise) or (type(step.module) is nn.Linear and step.ctx.x.dim() == 2)
        for step in walked
    )


def needed_blocks(tape: Tape) -> dict[Tensor, Tensor]:
    """{first layer's weight: indices b of the blocks of 8 columns 8b, …, 8b + 7 with a nonzero
    input in the batch}, the blocks its Hutchinson estimate depends on (module docstring); empty
    where all are needed, or where the weight's columns are not a multiple of 8 (so that a
    random byte of its probes lies in one row)."""
    *_, (first, _) = tape.backward_steps()
    w, h = _weight_and_bias(first)[0], first.ctx.x
    if w.shape[1] % 8:
        return {}
    needed = h.ne(0).any(0).view(-1, 8).any(1)
    return {} if bool(needed.all()) else {w: needed.nonzero().squeeze(1)}


def backpropagate(
    tape: Tape, probes: dict[Tensor, Tensor], sizes: list[int], blocks: dict[Tensor, Tensor] | None = None
) -> list[dict[Tensor, Tensor]]:
    """For probes z ({parameter: (M, *parameter)}) in consecutive sets of ``sizes`` (summing to M),
    per set the mean over its probes of z ∘ (H z), H the Hessian of the batch loss; keyed by parameter.

    ``blocks`` (from ``needed_blocks``): a weight whose probes are unpacked at these blocks of 8
    columns only, shape (M, out, 8 · number of blocks); its estimate is 0 in the other columns.
    All probes pass forward and backward together; only the final contraction is per set."""
    scale = tape.scale()  # the loss's reduction: H = scale · Σ_n ∂²ℓ_n
    steps = [step for step, _ in tape.backward_steps()][::-1]  # forward order, from the first layer
    columns = {w: (8 * b.unsqueeze(1) + torch.arange(8, device=b.device)).flatten() for w, b in (blocks or {}).items()}
    assert all(w is steps[0].module.weight for w in columns)  # where ḣ = 0 and ġ_h is not needed
    bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
    sets = [slice(bounds[s], bounds[s + 1]) for s in range(len(sizes))]
    z = probes  # Ż of the formulas above
    # forward: the tangent ẋ (N, M, *) at every step's input (None where it is zero), and at
    # every activation (σ'(x), σ''(x)) (N, 1, *) for both passes
    tangents: list[Tensor | None] = []
    derivatives: dict[int, tuple[Tensor, Tensor]] = {}
    t: Tensor | None = None
    for k, step in enumerate(steps):
        tangents.append(t)
        if isinstance(step.rule, Elementwise):
            d1, d2 = (d.unsqueeze(1) for d in tape.activation_derivatives(step))
            derivatives[k] = d1, d2
            t = None if t is None else d1 * t
            continue
        (w, b), h = _weight_and_bias(step), _input(step, columns)
        t_out = None if t is None else t @ w.T
        if w in z:  # Ż_W h: (M, out, in) @ (in, N) -> (N, M, out)
            product = native.probe_products(z[w].flatten(0, 1), h) if _packed(z[w]) else z[w].flatten(0, 1) @ h.T
            product = product.unflatten(0, z[w].shape[:2]).permute(2, 0, 1)
            t_out = product if t_out is None else t_out + product
        if b is not None and b in z:
            product = z[b].expand(h.shape[0], *z[b].shape)
            t_out = product if t_out is None else t_out + product
        t = t_out
    if t is None:  # no probed parameter: H z = 0
        return [{p: zp.new_zeros(zp.shape[1:]) for p, zp in z.items()} for _ in sizes]

    grad, hessian = tape.loss_derivatives("grad", "hessian")
    g = (scale * grad).unsqueeze(1)  # (N, 1, C)
    g_dot = t @ (scale * hessian)  # (N, M, C); H_ℓ is symmetric
    results: list[dict[Tensor, Tensor]] = [{} for _ in sizes]
    for k in range(len(steps) - 1, -1, -1):
        step, t_in = steps[k], tangents[k]
        if isinstance(step.rule, Elementwise):
            d1, d2 = derivatives[k]
            g_dot = d1 * g_dot if t_in is None else d1 * g_dot + d2 * t_in * g
            g = d1 * g
            continue
        (w, b), h = _weight_and_bias(step), _input(step, columns)
        g_dot_sum = g_dot.sum(0)  # (M, out)
        for m, result in zip(sets, results, strict=True):
            if w in z:
                result[w] = _weight_estimate(z[w][m], g_dot[:, m], h, g, None if t_in is None else t_in[:, m])
                if w in columns:
                    result[w] = w.new_zeros(w.shape).index_copy_(1, columns[w], result[w])
            if b is not None and b in z:
                result[b] = (z[b][m] * g_dot_sum[m]).mean(0)
        if k > 0:
            g_dot_in = g_dot @ w
            if w in z:  # Ż_Wᵀ g_y: (M, N, out) @ (M, out, in) -> (M, N, in), the probes read in place
                g_dot_in = g_dot_in + torch.bmm(g[:, 0].expand(z[w].shape[0], *g[:, 0].shape), z[w]).transpose(0, 1)
            g, g_dot = g @ w, g_dot_in
    return [{p: result[p] for p in z} for result in results]


def _weight_and_bias(step: Step) -> tuple[Tensor, Tensor | None]:
    assert isinstance(step.module, nn.Linear)  # checked by ``supported``
    return step.module.weight, step.module.bias


def _packed(z: Tensor) -> bool:
    """Whether probes ``z`` are kept as bits: (M, out, number of blocks) bytes, ``native``'s layout."""
    return z.dtype == torch.uint8


def _input(step: Step, columns: dict[Tensor, Tensor]) -> Tensor:
    """The input h (N, in) of a Linear step, at its weight's kept columns where it has some."""
    w, h = _weight_and_bias(step)[0], step.ctx.x
    return h.index_select(1, columns[w]) if w in columns else h


def _weight_estimate(zw: Tensor, g_dot: Tensor, h: Tensor, g: Tensor, h_dot: Tensor | None) -> Tensor:
    """mean_m Z_m ∘ Σ_n (ġ_nm h_nᵀ + g_n ḣ_nmᵀ) for probes zw (M, out, in), ġ (N, M, out), h (N, in),
    g (N, 1, out), ḣ (N, M, in) or None (always None for packed probes: the first layer's)."""
    assert h_dot is None or not _packed(zw)
    estimate = _rows_weighted(zw, g_dot[0]).mul_(h[0])
    for n in range(h.shape[0]):
        if n > 0:
            estimate += _rows_weighted(zw, g_dot[n]) * h[n]
        if h_dot is not None:
            estimate += g[n, 0].unsqueeze(1) * (zw * h_dot[n].unsqueeze(1)).sum(0)
    return estimate.div_(zw.shape[0])


def _rows_weighted(zw: Tensor, a: Tensor) -> Tensor:
    """Σ_m a_mj Z_mji for probes zw (M, out, in) and weights a (M, out): for several probes one
    batched product over the out rows that reads the probes once, for one the product itself;
    for packed probes the compiled loop that reads their bits."""
    if _packed(zw):
        return native.probe_contraction(zw, a)
    if zw.shape[0] == 1:
        return zw[0] * a[0].unsqueeze(1)
    return torch.bmm(a.T.contiguous().unsqueeze(1), zw.transpose(0, 1)).squeeze(1)
