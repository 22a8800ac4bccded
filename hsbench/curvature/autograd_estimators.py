"""Estimators that need only autograd, so they work for any differentiable model and loss:
the squared gradient g² and Hutchinson's z ∘ (H z) (Yao et al. 2021, AdaHessian); for networks
the curvature core records (Linear layers and activations), H z comes from a walk of the
recorded forward pass instead (``hutchinson_backprop``), same numbers up to float rounding."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from torch.utils._pytree import tree_map

from hsbench.curvature import hutchinson_backprop, native
from hsbench.curvature.tape import Tape, record


def _parameters(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def _loss(model: nn.Module, loss_fn):
    buffers = dict(model.named_buffers())

    def loss(params, x, t):
        return loss_fn(functional_call(model, {**params, **buffers}, (x,)), t)

    return loss


def _target_dim(targets) -> int | None:
    """vmap's in_dim of the targets: None for a loss without target (``hsbench.losses.Entropy``)."""
    return None if targets is None else 0


def _of_one(loss):
    """The loss of one sample as a batch of one: ℓ_n, for vmap over samples."""

    def of_one(params, x, t):
        return loss(params, x.unsqueeze(0), None if t is None else tree_map(lambda u: u.unsqueeze(0), t))

    return of_one


def squared_gradient(model, loss_fn, inputs, targets, per_sample: bool = False) -> dict[str, Tensor]:
    """(∂L/∂θ)² of the batch loss, or (∂ℓ_n/∂θ)² per sample."""
    if per_sample:
        loss, params = _loss(model, loss_fn), _parameters(model)
        per_sample_grad = vmap(grad(_of_one(loss)), in_dims=(None, 0, _target_dim(targets)), randomness="different")
        g = per_sample_grad(params, inputs, targets)
    else:  # plain autograd: a fraction of torch.func's overhead on small networks
        named = {k: p for k, p in model.named_parameters() if p.requires_grad}
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
        g = dict(zip(named, torch.autograd.grad(loss, list(named.values())), strict=True))
    return {k: v.square() for k, v in g.items()}


def rademacher(params: dict[str, Tensor], samples: int, generator=None) -> dict[str, Tensor]:
    """``samples`` Rademacher vectors (±1 entries) per parameter, shape (samples, *parameter);
    each entry is one bit of a random byte (several times faster than one integer per entry),
    bit k of a byte (least significant first) giving entry 8·i + k; a 256 × 8 table of ±1
    turns each byte into its eight entries in one lookup."""
    return rademacher_sets(params, [samples], generator)


def rademacher_sets(
    params: dict[str, Tensor],
    sample_counts: list[int],
    generator=None,
    blocks: dict[str, Tensor] | None = None,
    packed: bool = False,
) -> dict[str, Tensor]:
    """The draws of successive ``rademacher`` calls with these sample counts, side by side in one
    tensor per parameter, shape (sum of the counts, *parameter).

    ``blocks`` ({name: indices b of blocks of 8 columns 8b, …, 8b + 7}) unpacks a matrix parameter
    only at those blocks' columns, shape (sum of the counts, rows, 8 · number of blocks): with a
    multiple of 8 columns each random byte holds one block of one row, so only the kept blocks'
    bytes are turned into entries; all bytes are drawn as for the full draw, so the generator
    ends in the same state and every entry kept is the full draw's. ``packed``: those parameters'
    kept bytes themselves, uint8 of shape (sum of the counts, rows, number of blocks), for the
    compiled loops that read them (``native.probe_products``, ``native.probe_contraction``)."""
    blocks = blocks or {}
    total = sum(sample_counts)
    probes = {
        k: p.new_empty((total, p.shape[0], _kept_shape(p, blocks[k])[1] // 8), dtype=torch.uint8)
        if packed and k in blocks
        else p.new_empty((total, *_kept_shape(p, blocks.get(k))))
        for k, p in params.items()
    }
    kept_bytes = {}  # per blocked parameter: the position of each (probe row, kept block) byte in its set's bytes
    for k, b in blocks.items():
        rows = torch.arange(len(probes[k]) * params[k].shape[0], device=b.device)
        kept_bytes[k] = (rows.unsqueeze(1) * (params[k].shape[1] // 8) + b).flatten()
    start = 0
    for samples in sample_counts:
        for k, p in params.items():
            random_bytes = torch.randint(
                0, 256, ((samples * p.numel() + 7) // 8,), dtype=torch.uint8, generator=generator, device=p.device
            )
            into = probes[k][start : start + samples]
            if k in kept_bytes:  # the bytes of the kept blocks, row after row
                kept = kept_bytes[k][: samples * p.shape[0] * len(blocks[k])]
                if packed:  # kept as they are
                    torch.index_select(random_bytes, 0, kept, out=into.view(-1))
                    continue
                random_bytes = random_bytes.index_select(0, kept)
            signs, n = _signs(p.dtype, p.device), into.numel()
            if n % 8:
                into.copy_(torch.index_select(signs, 0, random_bytes.int()).flatten()[:n].view(into.shape))
            else:  # straight into place
                torch.index_select(signs, 0, random_bytes.int(), out=into.view(-1, 8))
        start += samples
    return probes


def _kept_shape(p: Tensor, blocks: Tensor | None) -> tuple[int, ...]:
    """The shape of one probe of ``p`` unpacked at these blocks of 8 columns (None: all of it)."""
    if blocks is None:
        return tuple(p.shape)
    if p.dim() != 2 or p.shape[1] % 8:
        raise ValueError(f"blocks of 8 columns need a matrix with a multiple of 8 columns; got shape {tuple(p.shape)}")
    return (p.shape[0], 8 * len(blocks))


@functools.cache
def _signs(dtype: torch.dtype, device: torch.device) -> Tensor:
    """``_SIGNS`` in this dtype on this device, made once."""
    return _SIGNS.to(device=device, dtype=dtype)


_SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1) * 2 - 1
"""Row b: the eight bits of the byte b (least significant first) as ±1."""


def hutchinson(model, loss_fn, inputs, targets, samples: int, generator=None, per_sample: bool = False):
    """mean over ``samples`` Rademacher draws z of z ∘ (H z).

    With per_sample=True every sample's Hessian is probed with the same draws."""
    return hutchinson_sets(model, loss_fn, inputs, targets, [samples], generator, per_sample)[0]


def hutchinson_sets(
    model, loss_fn, inputs, targets, sample_counts: list[int], generator=None, per_sample: bool = False, tape=None
) -> list[dict[str, Tensor]]:
    """One Hutchinson estimate per entry of ``sample_counts``, with the draws of as many
    successive ``hutchinson`` calls (set after set, in that order) and one pass for all of them.

    H z comes from ``hutchinson_backprop``'s walk of the recorded forward pass (``tape``, recorded
    here if None) for a batch loss of a network of Linear layers and activations, else from
    autograd: reverse over reverse, all Hessian-vector products in one vmap. The walk unpacks the
    probes of the first layer's weight only where its estimate can be nonzero (``needed_blocks``),
    and on the CPU keeps them as bits for the compiled loops of ``native`` where they are available.
    A tape recorded here is recorded before the probes are drawn: with ``generator=None`` and a
    forward pass that draws from torch's global generator, the draws follow that forward's."""
    params = _parameters(model)
    sizes = list(sample_counts)
    if not per_sample:
        tape = tape if tape is not None else _tape_or_none(model, loss_fn, inputs, targets)
        if tape is not None and hutchinson_backprop.supported(tape):
            tensors = {k: p for k, p in model.named_parameters() if k in params}
            name_of = {p: k for k, p in tensors.items()}
            blocks = {w: b for w, b in hutchinson_backprop.needed_blocks(tape).items() if w in name_of}
            packed = all(w.device.type == "cpu" and native.available(w.dtype) for w in blocks)
            probes = rademacher_sets(params, sizes, generator, {name_of[w]: b for w, b in blocks.items()}, packed)
            with torch.no_grad():
                found = hutchinson_backprop.backpropagate(
                    tape, {p: probes[k] for k, p in tensors.items()}, sizes, blocks
                )
            return [{k: estimate[p] for k, p in tensors.items()} for estimate in found]
    probes = rademacher_sets(params, sizes, generator)
    loss = _loss(model, loss_fn)

    def estimate(params, x, t, probes, f):
        _, hvp = vjp(lambda p: grad(f)(p, x, t), params)  # reverse over reverse: Hᵀ v = H v
        (hz,) = vmap(hvp, randomness="same")(probes)
        products = {k: (probes[k] * hz[k]).split(sizes) for k in params}
        return [{k: parts[s].mean(0) for k, parts in products.items()} for s in range(len(sizes))]

    if per_sample:
        return vmap(estimate, in_dims=(None, 0, _target_dim(targets), None, None), randomness="different")(
            params, inputs, targets, probes, _of_one(loss)
        )
    return estimate(params, inputs, targets, probes, loss)


def _tape_or_none(model, loss_fn, inputs, targets) -> Tape | None:
    """The recorded forward pass, or None for a model or loss that the curvature core does not know."""
    try:
        return record(model, loss_fn, inputs, targets)
    except ValueError:
        return None
