"""Experiment kinds: the contract between the engine and the code of one experiment.

A kind declares its settings schema (a mapping name -> :class:`Field`), runs one point of a
sweep (``run(settings, ctx) -> metrics``) and draws its figures from stored results
(``plot(df, spec, outdir) -> list of paths``); it may also export stored results in formats of
its own (``export_formats``, ``export``). Metrics are JSON-serialisable: numbers, strings, and
lists for per-step or per-epoch series. A run whose metrics hold NaN or inf, or that raises
:class:`Diverged`, is recorded as ``diverged``; any other exception as ``failed``.

The engine never imports a kind: the command line hands it the registry
(``hsbench.experiments.KINDS``), and a run names its kind by import path (:func:`import_path`),
which :func:`load_kind` resolves in whichever process executes the run (a pool worker, a SLURM job).

Declaring a kind is cheap. Checking a spec, ``hsbench list`` and ``hsbench run`` with a bad setting or
scale import the kind's module, and answer at once because that import loads neither torch, numpy,
pandas, matplotlib nor gymnasium (``tests/test_cli_speed.py``). A kind module therefore imports at
its top only the standard library, this module and hsbench modules that follow the same rule; its
fields' ``choices`` are plain values (the names of registries that import torch are repeated as
strings in ``hsbench.experiments.names``). Every other module it uses is bound at the top with
:class:`LazyModule`, which imports it on the first attribute access, and is used qualified
(``torch.zeros``, ``optim.make``, ``figure.Figure``); a type checker sees the real modules.
hsbench's kinds take these bindings from one place, ``hsbench.experiments.lazy``::

    if TYPE_CHECKING:
        import torch
        from hsbench import optim
    else:
        torch, optim = LazyModule("torch"), LazyModule("hsbench.optim")
"""

from __future__ import annotations

import functools
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from hsbench.engine.runner import RunContext
    from hsbench.engine.spec import Spec

REQUIRED = object()
"""Default of a field that every spec must set."""


class Diverged(Exception):
    """Raised by a kind's ``run`` to stop a run that diverged, keeping the metrics so far."""

    def __init__(self, message: str, metrics: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.metrics = dict(metrics or {})


@dataclass(frozen=True)
class Field:
    """One setting of a kind: its type, default, admissible values and a one-line doc.

    ``type`` is one of int, float, str, bool (an int is accepted where a float is expected).
    ``choices`` is a collection (hsbench's kinds use the plain name tuples of
    ``hsbench.experiments.names``) or a zero-argument callable returning one; a callable is
    called on every check, so it must not import torch (see the module docstring).
    ``low`` / ``high`` bound numbers inclusively.
    """

    type: type
    doc: str
    default: Any = REQUIRED
    choices: Iterable[Any] | Callable[[], Iterable[Any]] | None = None
    low: float | None = None
    high: float | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def allowed(self) -> list[Any] | None:
        if self.choices is None:
            return None
        return list(self.choices() if callable(self.choices) else self.choices)

    def check(self, value: Any) -> Any:
        """Return ``value`` converted to the field's type, or raise ValueError saying why not."""
        ok = isinstance(value, self.type) and not (self.type is int and isinstance(value, bool))
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ValueError(f"expected {self.type.__name__}, got {type(value).__name__} {value!r}")
        if self.type is float and not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value!r}")
        allowed = self.allowed()
        if allowed is not None and value not in allowed:
            raise ValueError(f"unknown value {value!r}; choose from {', '.join(map(str, allowed))}")
        if self.low is not None and value < self.low:
            raise ValueError(f"{value!r} is below the minimum {self.low!r}")
        if self.high is not None and value > self.high:
            raise ValueError(f"{value!r} is above the maximum {self.high!r}")
        return value


class ExperimentKind(ABC):
    """Base class of experiment kinds; subclasses set ``name``, ``description``, ``fields``.

    A subclass must be constructible without arguments (:func:`load_kind` does so). Changing a
    field's default changes what the stored runs that used it mean: they no longer match and run
    again (see ``hsbench.engine.spec.run_id``); adding a field with a default leaves them valid.
    """

    name: str
    description: str
    fields: Mapping[str, Field]
    export_formats: tuple[str, ...] = ()
    """Formats besides csv and parquet that :meth:`export` writes (``hsbench export --format``)."""
    devices: tuple[str, ...] = ("cpu", "cuda")
    """Device types (``torch.device(...).type``) the computation of a run can use; a kind that
    computes on the CPU whatever the device sets ``("cpu",)``, and ``--device cuda`` is then rejected."""

    def required_data(self, settings: Mapping[str, Any]) -> list[str]:
        """Data sets (``hsbench download`` names) a run with ``settings`` reads from the data directory.

        ``hsbench run`` checks them once, before anything runs or is submitted; default: none.
        """
        return []

    @abstractmethod
    def run(self, settings: Mapping[str, Any], ctx: RunContext) -> dict[str, Any]:
        """Run one point of the sweep and return its metrics."""

    @abstractmethod
    def plot(self, df: pd.DataFrame, spec: Spec, outdir: Path) -> list[Path]:
        """Draw the experiment's figures from ``hsbench.results.load`` rows into ``outdir``."""

    def export(self, df: pd.DataFrame, spec: Spec, fmt: str, outdir: Path) -> Path:
        """Write the stored results ``df`` in ``fmt``, one of ``export_formats``, to ``outdir``; return the path."""
        raise ValueError(f"kind {self.name} exports no format {fmt!r}; only csv and parquet")


def run_device(kind: ExperimentKind, requested: str | None, cuda_available: bool) -> str:
    """The device a run of ``kind`` computes on, given ``--device`` (None: cuda if available and used).

    Raises ValueError with a one-line reason when the kind cannot run on the requested device.
    """
    if requested is None:
        return "cuda" if cuda_available and "cuda" in kind.devices else "cpu"
    device_type = requested.partition(":")[0]
    if device_type not in kind.devices:
        where = " or ".join(d.upper() if d == "cpu" else d for d in kind.devices)
        raise ValueError(f"--device {requested}: kind {kind.name} runs on the {where} only")
    if device_type == "cuda" and not cuda_available:
        raise ValueError(f"--device {requested}: cuda requested but not available")
    return requested


def import_path(kind: ExperimentKind) -> str:
    """``'module:Class'`` of ``kind``, from which :func:`load_kind` builds it again in another process."""
    cls = type(kind)
    return f"{cls.__module__}:{cls.__qualname__}"


class LazyModule:
    """Stands for the module ``name``, imported on the first attribute access (see the module docstring)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


@functools.cache
def load_kind(path: str) -> ExperimentKind:
    """The kind whose class is at import path ``'module:Class'`` (one instance per process)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)()
