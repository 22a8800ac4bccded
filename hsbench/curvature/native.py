"""Compiled loops for two memory-bound steps of the walks, each one pass where torch makes several.

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

**Rademacher probes kept as bits** (``probe_products``, ``probe_contraction``). Hutchinson's walk
(``hutchinson_backprop``) needs two contractions of the first layer's probes Z (M, out, in), drawn
as random bytes whose bit k gives entry 8b + k of byte b (``autograd_estimators.rademacher``):
Z h over the inputs (forward) and Σ_m a_m Z_m over the probes (the estimate). Eagerly the probes
are first written out as floats (M · out · in of them, 8 bytes each in float64) and read twice;
these loops read the bytes, eight entries per byte, from a 256-row table of ±1.

Both are compiled once per machine with the system's C compiler (``cc``, or ``$CC``) into a cache
folder (``$XDG_CACHE_HOME/hsbench``, default ``~/.cache/hsbench``); with GCC on x86-64 as clones
for AVX-512, AVX2 and plain x86-64 that the loader picks from (``target_clones``), without
contracting multiplies and adds into FMAs, so that every clone gives the same bits. Where there is
no compiler, or the compile fails, ``available`` is False (with one warning), ``linear_pullbacks``
returns None, and the callers compute eagerly: the same numbers to float rounding (the sums run
in another order). ``HSBENCH_NATIVE=0`` in the environment when the loops are first asked for
switches them off.
"""

from __future__ import annotations

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

import torch
from torch import Tensor

SERVES_FROM = 1 << 15
"""``linear_pullbacks``: weights with fewer entries keep torch's products."""
PARALLEL_FROM = 1 << 20
"""``linear_pullbacks``: with several torch threads, weights this large take torch's parallel products."""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
#define INLINE static inline __attribute__((always_inline))

#define KERNELS(T, SUFFIX)                                                                    \
CLONES void linear_pullbacks_##SUFFIX(const T *restrict w, const T *restrict g,               \
        const T *restrict s, T *restrict out_g, T *restrict out_s, int64_t rows, int64_t cols) { \
    for (int64_t j = 0; j < cols; j++) { out_g[j] = 0; out_s[j] = 0; }                        \
    for (int64_t i = 0; i < rows; i++) {                                                      \
        const T *row = w + i * cols, gi = g[i], si = s[i];                                    \
        for (int64_t j = 0; j < cols; j++) {                                                  \
            const T x = row[j];                                                               \
            out_g[j] += gi * x;                                                               \
            out_s[j] += si * (x * x);                                                         \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
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
KERNELS(float, f32)
KERNELS(double, f64)
"""
FLAGS = ["-O3", "-ffp-contract=off", "-Wno-psabi", "-shared", "-fPIC"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_ARGUMENTS = {"linear_pullbacks": (5, 2), "probe_products": (3, 3), "probe_contraction": (3, 3)}
"""Each kernel's numbers of pointer and of int64 arguments."""


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
    _call("linear_pullbacks", weight.dtype, weight, g, s, out_g, out_s, *weight.shape)
    return out_g, out_s


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


def _check(shapes_fit: bool, message: str, tensors: list[Tensor], packed: Tensor | None = None) -> None:
    """ValueError unless the shapes fit, ``tensors`` share one float dtype of the loops, ``packed``
    is uint8, and all are on the CPU: the loops read raw memory, where torch would refuse."""
    everything = tensors if packed is None else [*tensors, packed]
    fit = (
        shapes_fit
        and tensors[0].dtype in _SUFFIX
        and all(t.dtype == tensors[0].dtype for t in tensors)
        and (packed is None or packed.dtype == torch.uint8)
        and all(t.device.type == "cpu" for t in everything)
    )
    if not fit:
        found = ", ".join(f"{tuple(t.shape)} {t.dtype} {t.device}" for t in everything)
        raise ValueError(f"hsbench.curvature.native: {message}, on the CPU, in one float dtype; got {found}")


def _call(kernel: str, dtype: torch.dtype, *args: Tensor | int) -> None:
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
        for kernel, (pointers, integers) in _ARGUMENTS.items():
            function = getattr(library, f"{kernel}_{suffix}")
            function.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * integers
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
    key = hashlib.sha256("\0".join([SOURCE, *flags, *compiler, platform.machine(), sys.platform]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hsbench"
    target = cache / f"native-{key.hexdigest()[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            source, built = Path(tmp) / "native.c", Path(tmp) / "native.so"
            source.write_text(SOURCE)
            subprocess.run([*compiler, *flags, "-o", str(built), str(source)], check=True, capture_output=True)
            os.replace(built, target)
    return target
