"""Interleaved timing: several computations timed round-robin, so that machine drift hits all alike.

A task is a pair ``(prepare, timed)`` of zero-argument callables; ``prepare`` runs untimed right
before each call of ``timed``. Every round calls each task once, in a fresh random order; the
first ``warmup`` rounds are not recorded. Times are seconds on one of the ``CLOCKS``:

* ``wall``: ``time.perf_counter``, after ``torch.cuda.synchronize()`` on a CUDA device;
* ``cpu``: the CPU time of this process (``time.process_time``), CPU devices only. With one
  torch thread it is the wall time the computation would take on an idle core; other jobs on a
  shared machine do not inflate it.
"""

from __future__ import annotations

import ctypes
import statistics
import time
from typing import Callable, Tuple  # noqa: UP035  (Python 3.8: see Task)

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

# typing's generics: this module also runs on Python 3.8 (hsbench.original_update_time, the original
# implementation's stack), where tuple[...] and collections.abc.Callable[...] cannot be subscripted
Task = Tuple[Callable[[], object], Callable[[], object]]  # noqa: UP006


MMAP_THRESHOLD, TRIM_THRESHOLD = 1 << 26, 1 << 28
"""``steady_allocator``'s thresholds (bytes): tensors up to 64 MB from the heap, which keeps up to
256 MB free at its top."""


def steady_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds (``mallopt``) for the rest of the process, so that
    tensors of up to ``MMAP_THRESHOLD`` bytes come from the heap and are reused, not mapped and
    page-faulted in anew whenever another task happened to free theirs. With glibc's default,
    self-adjusting thresholds that depends on the order of earlier allocations: in ``make bench``
    the same gradient-only backward took 0.20 ms in one process and 0.64 ms in the next. False
    where the C library has no ``mallopt`` or refuses it (not glibc): nothing changed."""
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):  # no C library to load by that name (Windows)
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h's parameter numbers
    return bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))


def interleaved(
    tasks: dict[str, Task],
    rounds: int,
    warmup: int,
    generator: torch.Generator,
    device: torch.device,
    clock: str = "wall",
) -> dict[str, list[float]]:
    """``rounds`` recorded times (seconds) of each task's ``timed`` call, keyed like ``tasks``."""
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; choose from {', '.join(CLOCKS)}")
    if clock == "cpu" and device.type != "cpu":
        raise ValueError(f"the cpu clock measures CPU devices only; got device {device}")
    read = CLOCKS[clock]
    sync = lambda: synchronize(device)  # noqa: E731
    names = list(tasks)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + rounds):
        for i in torch.randperm(len(names), generator=generator).tolist():
            prepare, timed = tasks[names[i]]
            prepare()
            sync()
            start = read()
            timed()
            sync()
            elapsed = read() - start
            if round_ >= warmup:
                times[names[i]].append(elapsed)
    return times


def summary(times: list[float]) -> dict[str, float]:
    """Median and quartiles (``median``, ``q25``, ``q75``) of a list of at least two times."""
    q25, median, q75 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median": median, "q25": q25, "q75": q75}


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA) before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
