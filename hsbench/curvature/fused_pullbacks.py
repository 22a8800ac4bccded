"""A linear layer's two pullbacks at batch size one, g W and ŝ (W ∘ W), in one pass over W.

HesScale's walk pulls the gradient g and the diagonal ŝ (both (out,)) back through a linear
layer's weight W (out, in). Eagerly that is ``g @ W`` and ``ŝ @ W.square()``: four passes over a
weight-sized block of memory (W read, W ∘ W written and read back, W read again), of which
autograd's gradient-only backward makes one. At batch size one the products are matrix-vector
products, bound by memory traffic, so those passes are most of what the curvature costs beyond
the gradient. The C loop below makes one: row by row, both sums advance over the row's entries::

    out_g[j] += g[i] · W[i, j]        out_s[j] += ŝ[i] · W[i, j]²      (i = 0 … out − 1)

It is compiled once per machine with the system's C compiler (``cc``, or ``$CC``) into a cache
folder (``$XDG_CACHE_HOME/hsbench``, default ``~/.cache/hsbench``), as clones for AVX-512,
AVX2 and plain x86-64 that the loader picks from (GCC's ``target_clones``), without contracting
multiplies and adds into FMAs, so that every clone and machine gives the same bits. Where there is
no compiler, or the compile fails, ``pullbacks`` returns None and the caller computes the products
eagerly (the same numbers to float rounding: each sum runs over i in order, where the BLAS
matrix-vector product may block it). ``HSBENCH_NATIVE=0`` in the environment switches the kernel off.

It serves weights of ``SERVES_FROM`` entries or more: smaller ones make few memory passes, and
they keep torch's products bit for bit (the reinforcement-learning policies, figure 2's network).
The kernel is single-threaded: with more than one torch thread it serves only weights the threads
would not speed up (below ``PARALLEL_FROM`` entries), larger ones take torch's parallel products.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

SERVES_FROM = 1 << 15
"""Weights with fewer entries keep torch's products."""
PARALLEL_FROM = 1 << 20
"""With several torch threads, weights of this many entries or more take torch's parallel products."""

SOURCE = r"""
#include <stdint.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
#define PULLBACKS(NAME, T)                                                                    \
    CLONES void NAME(const T *w, const T *g, const T *s, T *out_g, T *out_s, int64_t rows,   \
                     int64_t cols) {                                                          \
        for (int64_t j = 0; j < cols; j++) { out_g[j] = 0; out_s[j] = 0; }                    \
        for (int64_t i = 0; i < rows; i++) {                                                  \
            const T *row = w + i * cols, gi = g[i], si = s[i];                                \
            for (int64_t j = 0; j < cols; j++) {                                              \
                const T x = row[j];                                                           \
                out_g[j] += gi * x;                                                           \
                out_s[j] += si * (x * x);                                                     \
            }                                                                                 \
        }                                                                                     \
    }
PULLBACKS(pullbacks_f32, float)
PULLBACKS(pullbacks_f64, double)
"""
FLAGS = ["-O3", "-ffp-contract=off", "-shared", "-fPIC"]


def pullbacks(weight: Tensor, g: Tensor, s: Tensor) -> tuple[Tensor, Tensor] | None:
    """(g W, ŝ (W ∘ W)), each (in,), for ``weight`` (out, in) and ``g``, ``s`` (out,), in one pass
    over the weight; None where the kernel does not serve these tensors (a small weight, another
    device or dtype, a strided weight, several threads on a large weight) or no compiled kernel is
    available."""
    kernel = _KERNELS.get(weight.dtype)
    if (
        kernel is None
        or weight.numel() < SERVES_FROM
        or weight.device.type != "cpu"
        or not weight.is_contiguous()
        or (weight.numel() >= PARALLEL_FROM and torch.get_num_threads() > 1)
    ):
        return None
    functions = _library()
    if functions is None:
        return None
    g, s = g.contiguous(), s.contiguous()
    out_g, out_s = weight.new_empty(weight.shape[1]), weight.new_empty(weight.shape[1])
    getattr(functions, kernel)(
        weight.data_ptr(), g.data_ptr(), s.data_ptr(), out_g.data_ptr(), out_s.data_ptr(), *weight.shape
    )
    return out_g, out_s


_KERNELS = {torch.float32: "pullbacks_f32", torch.float64: "pullbacks_f64"}


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernels (compiled on the first call on this machine), or None with a warning."""
    if os.environ.get("HSBENCH_NATIVE", "1") == "0":
        return None
    try:
        library = ctypes.CDLL(str(_compiled()))
    except (OSError, subprocess.CalledProcessError, RuntimeError) as error:
        warnings.warn(f"hsbench: fused pullbacks unavailable, computed eagerly ({error})", stacklevel=3)
        return None
    for name in _KERNELS.values():
        getattr(library, name).argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 2
        getattr(library, name).restype = None
    return library


def _compiled() -> Path:
    """The shared library, compiled into the cache folder unless there already: named by the
    source, flags, compiler and machine, written under a temporary name and renamed into place
    (processes compiling at once each write their own and the last rename wins)."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) found")
    key = hashlib.sha256("\0".join([SOURCE, *FLAGS, compiler, platform.machine(), sys.platform]).encode())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hsbench"
    target = cache / f"fused_pullbacks-{key.hexdigest()[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            source, built = Path(tmp) / "fused_pullbacks.c", Path(tmp) / "fused_pullbacks.so"
            source.write_text(SOURCE)
            subprocess.run([compiler, *FLAGS, "-o", str(built), str(source)], check=True, capture_output=True)
            os.replace(built, target)
    return target
