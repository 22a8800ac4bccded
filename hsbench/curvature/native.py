"""Compiled loops for steps of the walks and of the optimizers' update, each one pass where torch
makes several.

**A linear layer's two pullbacks at batch size one** (``linear_pullbacks``). HesScale's walk pulls
the gradient g and the diagonal ŝ (both (out,)) back through a linear layer's weight W (out, in).
Eagerly that is ``g @ W`` and ``ŝ @ W.square()``: four passes over a weight-sized block of memory
(W read, W ∘ W written and read back, W read again), of which autograd's gradient-only backward
makes one. At batch size one these are matrix-vector products, bound by memory traffic, so those
passes are most of what the curvature costs beyond the gradient. The loop makes one: row by row,
both sums advance over the row's entries, ``out_g[j] += g[i] W[i, j]``, ``out_s[j] += ŝ[i] W[i, j]²``.
It serves weights of ``SERVES_FROM`` entries or more: smaller ones make few memory passes, and
keep torch's products bit for bit (the reinforcement-learning policies, figure 2's network). It is
single-threaded: with more than one torch thread it serves only weights below ``PARALLEL_FROM``
entries, larger ones take torch's parallel products.

**HesScale's whole walk at batch size one** (``diagonal_walk``). What the optimizers ask for at
batch size one (``diagonal_backprop.backpropagate``, factored, with gradients) through a chain of
linear layers and activations, such as the MLPs of figure 8: each module's step is a few passes
over vectors plus, per linear layer, the pullbacks above and the gradient's outer product g ⊗ x,
yet walked from Python it is ten to twenty torch calls per module, which cost more than the
arithmetic. Here the whole walk is one call: the linear layers
in the pullbacks' loop at every size (bit for bit the torch walk's numbers where that walk uses
the loop; below ``SERVES_FROM`` it takes torch's products, which sum in another order), the
activations' updates ŝ ← σ'² ŝ + σ'' g and g ← σ' g with torch's roundings (its fused
multiply-add included), and the derivatives σ', σ'' of tanh and sigmoid computed in the loop from
the recorded outputs, as ``modules`` writes them (other activations hand them over). The same
thread rule as the pullbacks'.

**Rademacher probes kept as bits** (``probe_products``, ``probe_contraction``). Hutchinson's walk
(``hutchinson_backprop``) needs two contractions of the first layer's probes Z (M, out, in), drawn
as random bytes whose bit k gives entry 8b + k of byte b (``autograd_estimators.rademacher``):
Z h over the inputs (forward) and Σ_m a_m Z_m over the probes (the estimate). Eagerly the probes
are first written out as floats (M · out · in of them, 8 bytes each in float64) and read twice;
these loops read the bytes, eight entries per byte, from a 256-row table of ±1.

**The optimizers' update** (``UpdatePasses``). The Adam-style step of ``optim._new_state`` runs
op by op as about twenty passes over each parameter, each a Python call of several µs: on the
small networks of figure 8 and of the reinforcement-learning policies those calls cost more than
the arithmetic. Here each of the step's two passes (the sums that the divergence check and the
step-size scaling need, then the writes) is one loop over every entry of every parameter, and
one call. Its arithmetic is torch's, operation by operation, with the fused multiply-adds that
torch's vectorized lerp and addcmul make on this VM, so the moments come out the same bit for bit
there; the moves differ where torch's vectorized square root is not correctly rounded (by one
unit in the last place, on this VM for 1.3 % of float64 and 17 % of float32 entries), and h by
the order of its sum.

All are compiled once per machine with the system's C compiler (``cc``, or ``$CC``) into a cache
folder (``$XDG_CACHE_HOME/hsbench``, default ``~/.cache/hsbench``); with GCC on x86-64 as clones
for AVX-512, AVX2 and plain x86-64 that the loader picks from (``target_clones``), without
contracting multiplies and adds into FMAs (the update's are written out), so that every clone
gives the same bits. Where there is
no compiler, or the compile fails, ``available`` is False (with one warning), ``linear_pullbacks``
returns None, and the callers compute eagerly: the same numbers to float rounding (the sums run
in another order). ``HSBENCH_NATIVE=0`` in the environment when the loops are first asked for
switches them off.
"""

from __future__ import annotations

import array
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

SERVES_FROM = 1 << 15
"""``linear_pullbacks``: weights with fewer entries keep torch's products."""
PARALLEL_FROM = 1 << 20
"""``linear_pullbacks``: with several torch threads, weights this large take torch's parallel products."""


def _macro(signature: str, body: str) -> str:
    """``#define signature body``, the line continuations added here (``body`` has no // comments)."""
    return f"#define {signature} \\\n" + " \\\n".join(body.strip("\n").splitlines()) + "\n"


_UPDATE_FLAGS = {"gradient": 1, "trust": 2, "corrected": 4, "rank_one": 8, "apply": 16}
"""``UpdatePasses``'s flags (also the C source's defines): ``optim._Form``'s three (Scaled Adam's
preconditioner, step-size scaling, h from the bias-corrected v̂), d as factors, the writing pass."""
_GRADIENT, _TRUST, _CORRECTED, _RANK_ONE, _APPLY = _UPDATE_FLAGS.values()
_FORMS = [
    f for f in range(32) if not (f & _APPLY and f & (_TRUST | _CORRECTED)) and not (f & _CORRECTED and not f & _TRUST)
]
"""The flags that the update's C function has a loop for: the writing pass needs no h (no trust
or corrected), and corrected only matters with trust."""
_WALK_STEPS = {"walk_scaled": 0, "walk_linear": 1, "walk_derivatives": 2, "walk_tanh": 3, "walk_sigmoid": 4}
"""The C walk's kinds of step (also the C source's defines): the scaled start, a linear layer,
an activation with σ' and σ'' given, and the activations whose derivatives it computes itself."""
_WALK_SCALED, _WALK_LINEAR, _WALK_DERIVATIVES = (_WALK_STEPS[f"walk_{k}"] for k in ("scaled", "linear", "derivatives"))
WALK_ACTIVATIONS = {"tanh": _WALK_STEPS["walk_tanh"], "sigmoid": _WALK_STEPS["walk_sigmoid"]}
"""The activations whose σ', σ'' ``diagonal_walk`` computes from their output y
(``WalkActivation``), with the roundings of ``modules._tanh`` and ``modules._sigmoid``."""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))
DEFINES
#define LANES 8
#define RUN(SUFFIX, F) rows_##SUFFIX(F, p, m, v, w, g, d, col, row, moves, rows, cols, k, s, acc); break;
#define FMA_f32 __builtin_fmaf
#define FMA_f64 __builtin_fma
#define SQRT_f32 __builtin_sqrtf
#define SQRT_f64 __builtin_sqrt

#define KERNELS(T, SUFFIX)                                                                    \
typedef T v8_##SUFFIX __attribute__((vector_size(8 * sizeof(T))));                           \
static v8_##SUFFIX SIGNS_##SUFFIX[256];  /* row v: bit k of v as +1 or -1 */                 \
__attribute__((constructor)) static void make_signs_##SUFFIX(void) { /* when loaded */      \
    for (int v = 0; v < 256; v++)                                                             \
        for (int k = 0; k < 8; k++) SIGNS_##SUFFIX[v][k] = (v >> k) & 1 ? 1 : -1;             \
}                                                                                             \
INLINE v8_##SUFFIX load_##SUFFIX(const T *p) { v8_##SUFFIX x; memcpy(&x, p, sizeof x); return x; } \
/* t[r, n] = sum_j z[r, j] h[n, j] for bytes (rows, blocks), h (n_in, 8 blocks), t (rows, n_in) */ \
CLONES void probe_products_##SUFFIX(const uint8_t *restrict bytes, const T *restrict h,       \
        T *restrict t, int64_t rows, int64_t blocks, int64_t n_in) {                          \
    for (int64_t r = 0; r < rows; r++) {                                                      \
        const uint8_t *row = bytes + r * blocks;                                              \
        for (int64_t n = 0; n < n_in; n++) {                                                  \
            const T *hn = h + n * 8 * blocks;                                                 \
            v8_##SUFFIX acc = {0};                                                            \
            for (int64_t b = 0; b < blocks; b++) acc += SIGNS_##SUFFIX[row[b]] * load_##SUFFIX(hn + 8 * b); \
            t[r * n_in + n] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])); \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
/* c[i, j] = sum_m a[m, i] z[m, i, j] for bytes (m_count, rows, blocks), a (m_count, rows) */ \
CLONES void probe_contraction_##SUFFIX(const uint8_t *restrict bytes, const T *restrict a,    \
        T *restrict c, int64_t m_count, int64_t rows, int64_t blocks) {                       \
    memset(c, 0, sizeof(T) * rows * blocks * 8);                                              \
    for (int64_t m = 0; m < m_count; m++)                                                     \
        for (int64_t i = 0; i < rows; i++) {                                                  \
            const uint8_t *row = bytes + (m * rows + i) * blocks;                             \
            const T x = a[m * rows + i];                                                      \
            const v8_##SUFFIX am = {x, x, x, x, x, x, x, x};                                  \
            T *ci = c + i * blocks * 8;                                                       \
            for (int64_t b = 0; b < blocks; b++) {                                            \
                v8_##SUFFIX sum = load_##SUFFIX(ci + 8 * b) + am * SIGNS_##SUFFIX[row[b]];    \
                memcpy(ci + 8 * b, &sum, sizeof sum);                                         \
            }                                                                                 \
        }                                                                                     \
}

"""
SOURCE = SOURCE.replace(
    "DEFINES", "\n".join(f"#define {name.upper()} {n}" for name, n in {**_UPDATE_FLAGS, **_WALK_STEPS}.items())
)
SOURCE += _macro(
    "UPDATE(T, SUFFIX)",
    r"""
/* the new moments of one entry (optim._new_state): m, v and (GRADIENT) w, in place. Op by op as
   torch computes them, with the fused multiply-adds of torch's vectorized lerp and addcmul. */
INLINE void moments_##SUFFIX(T *m, T *v, T *w, T g, T d, const T *k, const int form) {
    const int small = k[0] < (T)0.5; /* torch's lerp: m + c (g - m) for a small weight c, else g + (c - 1) (g - m) */
    *m = FMA_##SUFFIX(small ? k[0] : k[0] - (T)1, g - *m, small ? *m : g);
    *v = FMA_##SUFFIX(k[2] * d, d, *v * k[1]);
    if (form & GRADIENT) *w = FMA_##SUFFIX(k[2] * g, g, *w * k[1]);
}
/* the move -U of one entry from its new moments, and h's term into *h (TRUST) */
INLINE T move_##SUFFIX(T m, T v, T w, const T *k, const int form, T *h) {
    const T root = SQRT_##SUFFIX(form & GRADIENT ? w : v) / k[3];
    const T move = m / (root + k[4]) * k[5];
    if (form & TRUST) {
        T curvature = root;
        if ((form & GRADIENT) || !(form & CORRECTED)) {
            curvature = SQRT_##SUFFIX(v);
            if (form & CORRECTED) curvature = curvature / k[3];
        }
        *h = curvature * (move * move);
    }
    return move;
}
/* entry j of a row, lane l. Without APPLY: its move into moves[j], its values added to the sums acc
   (in double): h's term, w, the move, v. With APPLY: its new moments written, p += s moves[j]. */
INLINE void one_##SUFFIX(const int form, T *restrict p, T *restrict m, T *restrict v, T *restrict w,
        const T *restrict g, const T *restrict d, T col, const T *restrict row, T *restrict moves,
        int64_t j, int l, const T *k, T s, double acc[4][LANES]) {
    T new_m = m[j], new_v = v[j], new_w = form & GRADIENT ? w[j] : 0, h = 0;
    moments_##SUFFIX(&new_m, &new_v, &new_w, g[j], form & RANK_ONE ? col * row[j] : d[j], k, form);
    if (form & APPLY) {
        m[j] = new_m; v[j] = new_v;
        if (form & GRADIENT) w[j] = new_w;
        p[j] = FMA_##SUFFIX(moves[j], s, p[j]);
    } else {
        const T move = moves[j] = move_##SUFFIX(new_m, new_v, new_w, k, form, &h);
        acc[0][l] += h; acc[1][l] += new_w; acc[2][l] += move; acc[3][l] += new_v;
    }
}
/* every row, LANES entries at a time (vectorized), then the rest of the row */
INLINE void rows_##SUFFIX(const int form, T *restrict p, T *restrict m, T *restrict v, T *restrict w,
        const T *restrict g, const T *restrict d, const T *restrict col, const T *restrict row,
        T *restrict moves, int64_t rows, int64_t cols, const T *k, T s, double acc[4][LANES]) {
    for (int64_t i = 0; i < rows; i++) {
        const int64_t at = i * cols;
        T *pi = form & APPLY ? p + at : p, *wi = form & GRADIENT ? w + at : w;
        const T *di = form & RANK_ONE ? d : d + at, ci = form & RANK_ONE ? col[i] : 0;
        int64_t j = 0;
        for (; j + LANES <= cols; j += LANES)
            for (int l = 0; l < LANES; l++)
                one_##SUFFIX(form, pi, m + at, v + at, wi, g + at, di, ci, row, moves + at, j + l, l, k, s, acc);
        for (; j < cols; j++)
            one_##SUFFIX(form, pi, m + at, v + at, wi, g + at, di, ci, row, moves + at, j, 0, k, s, acc);
    }
}
/* one parameter's pass (see update); its own function, not inlined, so that its pointers stay restrict */
static CLONES void one_update_##SUFFIX(T *restrict p, T *restrict m, T *restrict v, T *restrict w,
        const T *restrict g, const T *restrict d, const T *restrict col, const T *restrict row,
        T *restrict moves, int64_t rows, int64_t cols, int64_t form, const double *ks, double scale,
        double *restrict out) {
    const T k[6] = {ks[0], ks[1], ks[2], ks[3], ks[4], ks[5]}, s = scale;
    double acc[4][LANES] = {{0}};
    switch (form) { /* each flag a constant in its own loop */
    CASES
    default: /* flags no loop was compiled for: sums that fail the step's check */
        for (int q = 0; q < 4; q++) out[q] = __builtin_nan("");
        return;
    }
    for (int q = 0; q < 4; q++) {
        out[q] = 0;
        for (int l = 0; l < LANES; l++) out[q] += acc[q][l];
    }
}
/* One pass of the update of n parameters. Parameter q: pointers[9 q ...] are its p, m, v, w (GRADIENT,
   else NULL), g, d (NULL where d is rank-one: col[i] row[j]), col, row and moves, shapes[3 q ...]
   its rows, cols and whether d is rank-one, ks[6 q ...] its coefficients. The first pass (no APPLY in form) writes only
   the moves and the four sums of each parameter into out[4 q ...]; the second (APPLY, the same
   arguments) the moments, and p += scale moves. */
void update_##SUFFIX(int64_t n, void *const *pointers, const int64_t *shapes, const double *ks,
        int64_t form, double scale, double *out) {
    for (int64_t q = 0; q < n; q++) {
        void *const *a = pointers + 9 * q;
        one_update_##SUFFIX(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], shapes[3 * q],
            shapes[3 * q + 1], form | (shapes[3 * q + 2] ? RANK_ONE : 0), ks + 6 * q, scale, out + 4 * q);
    }
}
""".replace("CASES", " ".join(f"case {f}: RUN(SUFFIX, {f})" for f in _FORMS)),
)
SOURCE += _macro(
    "WALK(T, SUFFIX)",
    r"""
/* a linear step y = W x: where grad is not NULL the weight's gradient g x^T (rows, cols), where x2
   is not NULL x o x (cols), where out_g is not NULL the pullbacks g W and s (W o W) (cols), row by
   row in one pass (a tensor without entries may come as NULL: its loop has no iterations) */
static CLONES void walk_linear_##SUFFIX(const T *restrict w, const T *restrict x, const T *restrict g,
        const T *restrict s, T *restrict grad, T *restrict x2, T *restrict out_g, T *restrict out_s,
        int64_t rows, int64_t cols) {
    if (x2) for (int64_t j = 0; j < cols; j++) x2[j] = x[j] * x[j];
    if (out_g) for (int64_t j = 0; j < cols; j++) { out_g[j] = 0; out_s[j] = 0; }
    for (int64_t i = 0; i < rows; i++) {
        const T *row = w + i * cols, gi = g[i], si = s[i];
        if (grad)
            for (int64_t j = 0; j < cols; j++) grad[i * cols + j] = gi * x[j];
        if (out_g)
            for (int64_t j = 0; j < cols; j++) {
                const T wj = row[j];
                out_g[j] += gi * wj;
                out_s[j] += si * (wj * wj);
            }
    }
}
/* an elementwise step y = sigma(x), in place: s = s d1 d1 (+ d2 g where second), g = g d1, with the
   roundings of the torch walk's s.mul_(d1).mul_(d1).addcmul_(d2, g) and g.mul_(d1); d1 = sigma'(x)
   and d2 = sigma''(x) read from a and b (WALK_DERIVATIVES) or computed from y in a as modules.py does */
static CLONES void walk_elementwise_##SUFFIX(int64_t kind, const T *restrict a, const T *restrict b,
        T *restrict g, T *restrict s, int64_t n, int64_t second) {
    for (int64_t j = 0; j < n; j++) {
        T d1, d2;
        if (kind == WALK_TANH) { d1 = (T)1 - a[j] * a[j]; d2 = (T)-2 * a[j] * d1; }
        else if (kind == WALK_SIGMOID) { d1 = a[j] * ((T)1 - a[j]); d2 = d1 * ((T)1 - (T)2 * a[j]); }
        else { d1 = a[j]; d2 = b[j]; }
        const T t = s[j] * d1 * d1;
        s[j] = second ? FMA_##SUFFIX(d2, g[j], t) : t;
        g[j] = g[j] * d1;
    }
}
/* copies of g and s times scale */
static void walk_scaled_##SUFFIX(const T *restrict g, const T *restrict s, T *restrict g_out,
        T *restrict s_out, int64_t n, T scale) {
    for (int64_t j = 0; j < n; j++) { g_out[j] = scale * g[j]; s_out[j] = scale * s[j]; }
}
/* n steps of the walk in order. Step q: shapes[3 q ...] its kind (a WALK_ define) and sizes (linear:
   rows, cols; others: entries, 0), pointers[8 q ...] its arguments: walk_linear's w, x, g, s, grad,
   x2, out_g, out_s; walk_elementwise's a, b, g, s; walk_scaled's g, s, g_out, s_out. second: the
   elementwise steps' d2 g term; scale: walk_scaled's. */
void walk_##SUFFIX(int64_t n, const int64_t *shapes, void *const *pointers, int64_t second, double scale) {
    for (int64_t q = 0; q < n; q++) {
        const int64_t *h = shapes + 3 * q;
        void *const *a = pointers + 8 * q;
        if (h[0] == WALK_LINEAR) walk_linear_##SUFFIX(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], h[1], h[2]);
        else if (h[0] == WALK_SCALED) walk_scaled_##SUFFIX(a[0], a[1], a[2], a[3], h[1], (T)scale);
        else walk_elementwise_##SUFFIX(h[0], a[0], a[1], a[2], a[3], h[1], second);
    }
}
""",
)
SOURCE += "".join(f"{name}(float, f32)\n{name}(double, f64)\n" for name in ("KERNELS", "UPDATE", "WALK"))
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-Wno-psabi", "-shared", "-fPIC"]
LIBRARIES = ["-lm"]  # fma where the CPU has no instruction for it (the plain x86-64 clone)
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_ARGUMENTS = {
    "probe_products": "pppiii",
    "probe_contraction": "pppiii",
    "update": "ipppidp",
    "walk": "ippid",
}
"""Each kernel's arguments: pointer (p), int64 (i), double (d)."""
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "d": ctypes.c_double}


def available(dtype: torch.dtype) -> bool:
    """Whether the compiled loops serve tensors of ``dtype`` (compiling them on first use; where
    that fails, one warning)."""
    global _warned
    if dtype not in _SUFFIX:
        return False
    library = _library()
    if isinstance(library, str):
        if not _warned:
            _warned = True
            warnings.warn(f"hsbench: compiled loops unavailable, computed eagerly ({library})", stacklevel=3)
        return False
    return library is not None


def linear_pullbacks(weight: Tensor, g: Tensor, s: Tensor) -> tuple[Tensor, Tensor] | None:
    """(g W, ŝ (W ∘ W)), each (in,), for ``weight`` (out, in) and ``g``, ``s`` (out,), in one pass
    over the weight, without autograd; None where the loop does not serve these tensors (a small
    weight, another device or dtype, a strided weight, several threads on a large weight) or is
    not available."""
    if (
        weight.numel() < SERVES_FROM
        or weight.device.type != "cpu"
        or not weight.is_contiguous()
        or (weight.numel() >= PARALLEL_FROM and torch.get_num_threads() > 1)
        or not available(weight.dtype)
    ):
        return None
    _check(g.shape == s.shape == weight.shape[:1], "g and s must have the weight's rows", [weight, g, s])
    g, s = g.contiguous(), s.contiguous()
    out_g, out_s = weight.new_empty(weight.shape[1]), weight.new_empty(weight.shape[1])
    pointers = [weight.data_ptr(), 0, g.data_ptr(), s.data_ptr(), 0, 0, out_g.data_ptr(), out_s.data_ptr()]
    _walk(weight.dtype, [_WALK_LINEAR, *weight.shape], pointers, False, 1.0)
    return out_g, out_s


class WalkLinear(NamedTuple):
    """A step of ``diagonal_walk`` through a linear layer y = W x (+ b): ``weight`` W (out, in)
    and the recorded input ``x`` (``in`` entries)."""

    weight: Tensor
    x: Tensor


class WalkDerivatives(NamedTuple):
    """A step of ``diagonal_walk`` through an activation y = σ(x): σ'(x) and σ''(x), each with the
    activation's entries."""

    d1: Tensor
    d2: Tensor


class WalkActivation(NamedTuple):
    """A step of ``diagonal_walk`` through an activation of ``WALK_ACTIVATIONS`` (``name``), its
    derivatives computed in the loop from the recorded output ``y``."""

    name: str
    y: Tensor


class LinearSums(NamedTuple):
    """What ``diagonal_walk`` finds at a linear step: the weight's gradient ``grad`` = g ⊗ x
    (out, in; None, and not computed, for a weight that does not require it), ``g`` = ∂ℓ/∂y and ŝ
    (``s``) at the layer's output (out,) (the bias's gradient and diagonal; the weight's diagonal
    is ŝ ⊗ x²), and ``x2`` = x ∘ x (in,)."""

    grad: Tensor | None
    g: Tensor
    s: Tensor
    x2: Tensor


def serves_walk(g: Tensor, weights: list[Tensor]) -> bool:
    """Whether ``diagonal_walk`` serves a walk from ``g`` through linear layers of ``weights``: a
    compiler was found, on the CPU, in float32 or float64, and with several torch threads no
    weight of ``PARALLEL_FROM`` entries or more (torch's products are then parallel)."""
    parallel = torch.get_num_threads() > 1 and any(w.numel() >= PARALLEL_FROM for w in weights)
    return g.is_cpu and available(g.dtype) and not parallel


def diagonal_walk(
    g: Tensor, s: Tensor, scale: float, steps: list[WalkLinear | WalkDerivatives | WalkActivation], second: bool
) -> list[LinearSums] | None:
    """HesScale's walk (``diagonal_backprop``) at batch size one through ``steps``, last module
    first, as one C call: from scale · g and scale · ŝ at the network output (``g``, ``s``: its
    entries), every activation makes ŝ ← σ'² ŝ (+ σ'' g if ``second``) and g ← σ' g, every linear
    layer its weight's gradient (where the weight requires one), x², and (above the last step)
    the pullbacks g W and ŝ (W ∘ W) in one pass as ``linear_pullbacks``. Returns the
    ``LinearSums`` of the linear steps in order, or None where the loop does not serve
    (``serves_walk``). The last step must be a linear one (its input side is not computed). The
    numbers are those of the torch walk with ``linear_pullbacks``, bit for bit: the gradient's
    products are single roundings, and the sums run in the same order."""
    if not serves_walk(g, [step.weight for step in steps if isinstance(step, WalkLinear)]):
        return None
    last = len(steps) - 1
    size = g.numel()
    sizes = [size, size]  # the scaled g and s at the output, then per linear layer x² and (but the last) its pullbacks
    for i, step in enumerate(steps):
        if isinstance(step, WalkLinear):
            sizes += [step.weight.shape[-1]] * (1 if i == last else 3)
    vectors = iter(g.new_empty(sum(sizes)).split_with_sizes(sizes))
    g_now, s_now = next(vectors), next(vectors)
    g, s = g.contiguous(), s.contiguous()
    read = [g, s]  # every tensor the loop reads, checked before the call
    fits = g.shape == s.shape and len(steps) > 0 and isinstance(steps[-1], WalkLinear)
    shapes = [_WALK_SCALED, size, 0]
    pointers = [g.data_ptr(), s.data_ptr(), g_now.data_ptr(), s_now.data_ptr(), 0, 0, 0, 0]
    found = []
    for i, step in enumerate(steps):
        if isinstance(step, WalkLinear):
            weight, x = step.weight.contiguous(), step.x.contiguous()
            rows, cols = weight.shape
            fits = fits and rows == size and x.numel() == cols
            read += (weight, x)
            grad, x2 = torch.empty_like(weight) if step.weight.requires_grad else None, next(vectors)
            found.append(LinearSums(grad, g_now, s_now, x2))
            pointers += (weight.data_ptr(), x.data_ptr(), g_now.data_ptr(), s_now.data_ptr())
            pointers += (0 if grad is None else grad.data_ptr(), x2.data_ptr())
            if i < last:
                g_now, s_now, size = next(vectors), next(vectors), cols
                pointers += (g_now.data_ptr(), s_now.data_ptr())
            else:
                pointers += (0, 0)
            shapes += (_WALK_LINEAR, rows, cols)
            continue
        if isinstance(step, WalkDerivatives):
            kind, a, b = _WALK_DERIVATIVES, step.d1.contiguous(), step.d2.contiguous()
        else:
            kind, a = WALK_ACTIVATIONS[step.name], step.y.contiguous()
            b = a
        fits = fits and a.numel() == b.numel() == size
        read += (a, b)
        shapes += (kind, size, 0)
        pointers += (a.data_ptr(), b.data_ptr(), g_now.data_ptr(), s_now.data_ptr(), 0, 0, 0, 0)
    _check(fits, "the walk's steps must chain from g and s at the output to a last linear layer", read)
    _walk(g.dtype, shapes, pointers, second, scale)
    return found


def probe_products(packed: Tensor, h: Tensor) -> Tensor:
    """Z h: (R, N) for probes packed as bytes (R, B) (uint8, bit k of byte b: entry 8b + k is +1,
    else −1) and ``h`` (N, 8B), on the CPU, in a dtype that ``available`` confirmed."""
    _check(packed.dim() == 2 and h.shape[1:] == (8 * packed.shape[1],), "h must be (N, 8B)", [h], packed)
    h = h.contiguous()
    t = h.new_empty(packed.shape[0], h.shape[0])
    _call("probe_products", h.dtype, packed.contiguous(), h, t, packed.shape[0], packed.shape[1], h.shape[0])
    return t


def probe_contraction(packed: Tensor, a: Tensor) -> Tensor:
    """Σ_m a_mi Z_mij: (I, 8B) for probes packed as bytes (M, I, B) (as in ``probe_products``) and
    weights ``a`` (M, I), on the CPU, in a dtype that ``available`` confirmed."""
    _check(packed.dim() == 3 and a.shape == packed.shape[:2], "a must be (M, I)", [a], packed)
    a = a.contiguous()
    c = a.new_empty(packed.shape[1], 8 * packed.shape[2])
    _call("probe_contraction", a.dtype, packed.contiguous(), a, c, *packed.shape)
    return c


class Update(NamedTuple):
    """One parameter's tensors for ``UpdatePasses``: ``param``, its ``moments`` (m, v, and Scaled
    Adam's w or None), ``grad``, all with the parameter's entries; ``diagonal``, d with those
    entries or the factors (column (R,), row (C,)) of a rank-one d of R × C entries; and its
    six coefficients ``k`` (``optim._Item``'s)."""

    param: Tensor
    moments: tuple[Tensor, Tensor, Tensor | None]
    grad: Tensor
    diagonal: Tensor | tuple[Tensor, Tensor]
    k: tuple[float, ...]


class UpdatePasses:
    """The Adam-style update of ``optim._new_state`` for several parameters of one float dtype on
    the CPU, as two passes of one C call each: ``sums`` computes every entry's new moments and
    move −U and writes only the moves (into a buffer of its own); then ``apply`` writes the new
    moments and moves the parameters by scale · (−U), the square roots and divisions that bound
    the loop not computed again, and autograd's version counters of the tensors it wrote are
    advanced (as torch's in-place operations do). Every tensor is checked (shapes, dtype, device,
    contiguity) when the passes are made; they must not change between the two."""

    def __init__(self, updates: list[Update], gradient: bool, moves: Tensor) -> None:
        """``gradient``: every update has Scaled Adam's w (and only then). ``moves``: a contiguous
        buffer of at least as many entries as all parameters together, written by ``sums`` (a
        buffer kept from step to step: a fresh one would have its pages faulted in every step)."""
        self._dtype, self._gradient, self._count = updates[0].grad.dtype, gradient, len(updates)
        sizes = [u.param.numel() for u in updates]
        fits = moves.is_contiguous() and moves.numel() >= sum(sizes)
        _check(fits, "moves must be a contiguous buffer of at least the parameters' entries", [updates[0].grad, moves])
        self._moves = moves
        at, step = self._moves.data_ptr(), self._moves.element_size()
        pointers: list[int | None] = []
        shapes: list[int] = []
        ks: list[float] = []
        self._kept: list[Tensor] = []  # alive as long as their pointers
        self._written: list[Tensor] = []  # by ``apply``
        for u, size in zip(updates, sizes, strict=True):
            m, v, w = u.moments
            if isinstance(u.diagonal, Tensor):
                full, factors, rows = u.diagonal, [], 1
            else:
                full, factors = None, [t.contiguous() for t in u.diagonal]
                rows = factors[0].numel()
            whole = [t for t in (u.param, m, v, w, u.grad, full) if t is not None]
            fits = (
                all(t.numel() == size and t.is_contiguous() for t in whole)
                and (not factors or rows * factors[1].numel() == size)
                and (w is not None) == gradient
                and len(u.k) == 6
            )
            _check(fits, "update needs contiguous tensors of the parameter's entries", whole + factors + [moves])
            self._kept += whole + factors
            self._written += [t for t in (u.param, m, v, w) if t is not None]
            ends: list[Tensor | None] = [*factors] if factors else [None, None]
            pointers += [None if t is None else t.data_ptr() for t in (u.param, m, v, w, u.grad, full, *ends)] + [at]
            at += size * step
            shapes += [rows, size // max(rows, 1), bool(factors)]
            ks += u.k
        self._pointers = (ctypes.c_void_p * len(pointers))(*pointers)
        self._shapes = (ctypes.c_int64 * len(shapes))(*shapes)
        self._ks = (ctypes.c_double * len(ks))(*ks)
        self._out = (ctypes.c_double * (4 * self._count))()

    def sums(self, trust: bool, corrected: bool) -> list[tuple[float, float, float, float]]:
        """Per parameter, the sums (in double) of h's term (0 without ``trust``: step-size scaling;
        ``corrected``: from the bias-corrected v̂), of w (0 without), of −U and of v."""
        self._run(_GRADIENT * self._gradient | _TRUST * trust | _CORRECTED * (trust and corrected), 0.0)
        out = self._out
        return [(out[q], out[q + 1], out[q + 2], out[q + 3]) for q in range(0, 4 * self._count, 4)]

    def apply(self, scale: float) -> None:
        """The new moments written, every parameter moved by scale · (−U) (after ``sums``)."""
        self._run(_GRADIENT * self._gradient | _APPLY, scale)
        for t in self._written:
            torch.autograd.graph.increment_version(t)

    def _run(self, flags: int, scale: float) -> None:
        _call("update", self._dtype, self._count, self._pointers, self._shapes, self._ks, flags, scale, self._out)


def _check(shapes_fit: bool, message: str, tensors: list[Tensor], packed: Tensor | None = None) -> None:
    """ValueError unless the shapes fit, ``tensors`` share one float dtype of the loops, ``packed``
    is uint8, and all are on the CPU: the loops read raw memory, where torch would refuse."""
    everything = tensors if packed is None else [*tensors, packed]
    dtype = tensors[0].dtype
    fit = shapes_fit and dtype in _SUFFIX and (packed is None or packed.dtype == torch.uint8)
    for t in everything if fit else ():  # a loop, not all(...) of generators: called once per walk
        fit = fit and t.is_cpu and (t.dtype == dtype or t is packed)
    if not fit:
        found = ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in everything)
        raise ValueError(f"hsbench.curvature.native: {message}, on the CPU, in one float dtype; got {found}")


def _walk(dtype: torch.dtype, shapes: list[int], pointers: list[int], second: bool, scale: float) -> None:
    """The C walk of len(shapes) // 3 steps (see ``SOURCE``'s ``walk``); 0 in ``pointers`` is NULL.
    The arrays as ``array.array``s: built in C, where a ctypes array converts entry by entry."""
    shape_array, pointer_array = array.array("q", shapes), array.array("Q", pointers)
    addresses = shape_array.buffer_info()[0], pointer_array.buffer_info()[0]
    _call("walk", dtype, len(shapes) // 3, *addresses, second, scale)


def _call(kernel: str, dtype: torch.dtype, *args: Tensor | int | float | ctypes.Array) -> None:
    library = _library()
    if not isinstance(library, ctypes.CDLL):
        raise RuntimeError("hsbench.curvature.native: the compiled loops are not available (see `available`)")
    getattr(library, f"{kernel}_{_SUFFIX[dtype]}")(*(a.data_ptr() if isinstance(a, Tensor) else a for a in args))


_warned = False


@functools.cache
def _library() -> ctypes.CDLL | str | None:
    """The compiled loops (compiled on the first call on this machine); None where switched off
    (``HSBENCH_NATIVE=0``); the reason where they could not be built or loaded."""
    if os.environ.get("HSBENCH_NATIVE", "1") == "0":
        return None
    try:
        library = ctypes.CDLL(str(_compiled()))
    except subprocess.CalledProcessError as error:
        return f"{error}: {error.stderr.decode(errors='replace').strip()[-300:]}"
    except (OSError, RuntimeError) as error:
        return str(error)
    for suffix in _SUFFIX.values():
        for kernel, arguments in _ARGUMENTS.items():
            function = getattr(library, f"{kernel}_{suffix}")
            function.argtypes = [_CTYPES[a] for a in arguments]
            function.restype = None
    return library


def _compiled() -> Path:
    """The shared library, compiled into the cache folder unless there already: named by the
    source, flags, compiler and machine, written under a temporary name and renamed into place
    (processes compiling at once each write their own and the last rename wins)."""
    compiler = shlex.split(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or $CC) found")
    flags = [*FLAGS, "-march=x86-64"] if platform.machine() in ("x86_64", "AMD64") else FLAGS  # clones pick more
    key = hashlib.sha256("\0".join([SOURCE, *flags, *LIBRARIES, *compiler, platform.machine(), sys.platform]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hsbench"
    target = cache / f"native-{key.hexdigest()[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            source, built = Path(tmp) / "native.c", Path(tmp) / "native.so"
            source.write_text(SOURCE)
            command = [*compiler, *flags, "-o", str(built), str(source), *LIBRARIES]
            subprocess.run(command, check=True, capture_output=True)
            os.replace(built, target)
    return target
