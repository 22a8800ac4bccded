"""Experiment specs: one TOML file per experiment, validated, then expanded into runs.

Format (user documentation in docs/experiments.md):

.. code-block:: toml

    kind = "quadratic"            # a registered experiment kind
    description = "one line"
    [settings]                    # fixed settings: name = value
    [grid]                        # sweep axes: name = [values]; Cartesian product
    [seeds]                       # count = N (seeds 0..N-1) or list = [..]
    [slurm]                       # SLURM defaults (see SLURM_FIELDS)
    [scales.NAME.settings]        # a scale overrides settings, grid, seeds and slurm;
    [scales.NAME.grid]            #   a scale setting fixes a grid axis of the same name
    [scales.NAME.seeds]           #   and a scale grid axis replaces a fixed setting
    [scales.NAME.slurm]

The scale ``default`` exists even when not declared. The experiment name is the file stem.
``kind`` names one of the kinds the caller passes to :func:`load_spec` (the command line
passes ``hsbench.experiments.KINDS``; this module imports no kind). A run's resolved settings
hold every field of the kind (defaults filled in), its ``seed`` and its ``scale``; its id
(:func:`run_id`) hashes the kind's name and those settings that differ from the kind's
defaults, so adding a seed or a grid point only adds ids, and adding a field with a default
to the kind changes none. Every error is a :class:`SpecError` whose message names the file
and the field.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from hsbench.engine.kind import ExperimentKind, Field, import_path

TOP_KEYS = ("kind", "description", "settings", "grid", "seeds", "slurm", "scales")
SCALE_KEYS = ("settings", "grid", "seeds", "slurm")
RESERVED = ("seed", "scale")  # set by the engine, not by specs
DEFAULT_SCALE = "default"
MAX_RUNS = 100_000  # a sweep larger than this is refused unless the caller raises the limit (--max-runs)

SLURM_FIELDS = {
    "partition": Field(str, "partition to submit to; empty: the cluster's default", default=""),
    "time_min": Field(int, "time limit of one run, minutes", default=60, low=1),
    "cpus_per_task": Field(int, "CPU cores per run", default=1, low=1),
    "mem_gb": Field(float, "memory per run, GB", default=4.0, low=0.01),
    "gpus_per_node": Field(int, "GPUs per run", default=0, low=0),
    "array_parallelism": Field(int, "array tasks running at once", default=64, low=1),
}
SEED_KEYS = ("count", "list")  # seeds 0 .. count-1, or exactly the listed seeds


class SpecError(Exception):
    """An invalid spec; the message is one line: ``FILE: FIELD: problem``."""


@dataclass(frozen=True)
class Run:
    """One independent run: an experiment, its kind and its resolved settings.

    ``kind_path`` is the kind's import path ``'module:Class'`` (``hsbench.engine.kind.load_kind``),
    so that a run pickled to a pool worker or a SLURM job finds its kind there.
    """

    id: str
    experiment: str
    kind_path: str
    settings: dict[str, Any]

    def matches(self, record: Mapping[str, Any]) -> bool:
        """Whether a stored ``record`` of this id ran these settings: none it stores differs.

        A setting the record lacks is a field added since, at its default; one that differs is
        a default changed since, and the record no longer stands for this run.
        """
        stored = record["settings"]
        return all(stored.get(name, value) == value for name, value in self.settings.items())


@dataclass(frozen=True)
class Scaled:
    """A spec resolved for one scale: fixed settings, grid axes, seeds and SLURM parameters."""

    settings: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: Sequence[int]  # a range for `count = N`, so that a huge count costs nothing until expanded
    slurm: dict[str, Any]

    def size(self) -> int:
        """Number of runs: grid points times seeds."""
        return math.prod(len(values) for values in self.grid.values()) * len(self.seeds)


@dataclass(frozen=True)
class Spec:
    """A validated experiment spec."""

    name: str
    path: Path
    kind: ExperimentKind
    description: str
    settings: dict[str, Any]
    grid: dict[str, list[Any]]
    seeds: Sequence[int]
    slurm: dict[str, Any]
    scales: dict[str, dict[str, Any]]  # scale name -> validated overrides (SCALE_KEYS)

    def scale_names(self) -> list[str]:
        return [DEFAULT_SCALE] + [s for s in self.scales if s != DEFAULT_SCALE]

    def resolve(self, scale: str) -> Scaled:
        if scale not in self.scale_names():
            raise SpecError(f"{self.path}: scales.{scale}: unknown scale; choose from {', '.join(self.scale_names())}")
        over = self.scales.get(scale, {})
        settings, grid = dict(self.settings), dict(self.grid)
        for name, value in over.get("settings", {}).items():
            settings[name] = value
            grid.pop(name, None)
        for name, values in over.get("grid", {}).items():
            grid[name] = values
            settings.pop(name, None)
        for name, field in self.kind.fields.items():
            if name not in settings and name not in grid:
                if field.required:
                    raise SpecError(f"{self.path}: settings.{name}: missing required setting ({field.doc})")
                settings[name] = field.default
        slurm = {k: f.default for k, f in SLURM_FIELDS.items()} | self.slurm | over.get("slurm", {})
        return Scaled(settings, grid, over.get("seeds", self.seeds), slurm)

    def runs(self, scale: str = DEFAULT_SCALE, max_runs: int = MAX_RUNS) -> list[Run]:
        """Expand into runs: the grid's Cartesian product (in declared order) times the seeds.

        Raise SpecError, before expanding, if there would be more than ``max_runs``.
        """
        scaled = self.resolve(scale)
        if scaled.size() > max_runs:
            raise SpecError(
                f"{self.path}: scale {scale}: {scaled.size():,} runs, more than the limit of {max_runs:,}; "
                "reduce the grid or seeds, or raise the limit with --max-runs"
            )
        fields = self.kind.fields
        path = import_path(self.kind)
        runs = []
        for point in itertools.product(*scaled.grid.values()):
            values = scaled.settings | dict(zip(scaled.grid, point, strict=True))
            for seed in scaled.seeds:
                settings = {name: values[name] for name in fields} | {"seed": seed, "scale": scale}
                runs.append(Run(run_id(self.kind.name, fields, settings), self.name, path, settings))
        return runs


def run_id(kind: str, fields: Mapping[str, Field], settings: Mapping[str, Any]) -> str:
    """Stable id of a run: 16 hex digits of the SHA-256 of what identifies it.

    That is the kind's name and the resolved ``settings`` except those at their field's
    default, so that a field added with a default leaves every stored id unchanged; ``seed``,
    ``scale`` and required settings always count. (A default changed later leaves ids unchanged
    too; ``Run.matches`` then tells the stored records from the runs now declared.)
    """
    identity = {k: v for k, v in settings.items() if k not in fields or v != fields[k].default}
    canonical = json.dumps({"kind": kind, "settings": identity}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def find_spec(name: str | Path, experiments_dir: Path) -> Path:
    """Path of a spec given as a path or as an experiment name in ``experiments_dir``."""
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    return experiments_dir / f"{name}.toml"


def load_spec(path: str | Path, kinds: Mapping[str, ExperimentKind]) -> Spec:
    """Read and validate a spec whose ``kind`` is one of ``kinds`` (by name), resolving every scale.

    Raise SpecError on the first problem.
    """
    path = Path(path)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", path.stem):
        raise SpecError(f"{path}: file name: experiment names use letters, digits, '_', '-', '.'")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SpecError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise SpecError(f"{path}: not UTF-8 text (byte {e.start}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: invalid TOML: {e}") from None
    v = _Validator(path)
    v.keys(raw, TOP_KEYS, "")
    if "kind" not in raw:
        raise SpecError(f"{path}: kind: missing; choose from {', '.join(kinds)}")
    kind = kinds[v.value(Field(str, "experiment kind", choices=kinds), raw["kind"], "kind")]
    fields = kind.fields
    spec = Spec(
        name=path.stem,
        path=path,
        kind=kind,
        description=v.value(Field(str, "description", default=""), raw.get("description", ""), "description"),
        settings=v.settings(fields, v.table(raw, "settings", ""), "settings"),
        grid=v.grid(fields, v.table(raw, "grid", ""), "grid"),
        seeds=v.seeds(v.table(raw, "seeds", ""), "seeds") or [0],
        slurm=v.settings(SLURM_FIELDS, v.table(raw, "slurm", ""), "slurm"),
        scales=v.scales(fields, v.table(raw, "scales", "")),
    )
    for name in spec.grid:
        if name in spec.settings:
            raise SpecError(f"{path}: grid.{name}: also set in [settings]; keep one")
    for scale in spec.scale_names():
        spec.resolve(scale)  # reports missing required settings
    return spec


class _Validator:
    """Checks parts of one spec file, raising SpecError that names the file and the field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, problem: str) -> SpecError:
        return SpecError(f"{self.path}: {where}: {problem}")

    def keys(self, table: dict[str, Any], allowed: tuple[str, ...] | Mapping[str, Any], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(prefix + key, f"unknown key; expected one of {', '.join(allowed)}")

    def table(self, parent: dict[str, Any], key: str, prefix: str) -> dict[str, Any]:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(prefix + key, f"expected a table, got {type(value).__name__} {value!r}")
        return value

    def value(self, field: Field, value: Any, where: str) -> Any:
        try:
            return field.check(value)
        except ValueError as e:
            raise self.fail(where, str(e)) from None

    def settings(self, fields: Mapping[str, Field], table: dict[str, Any], prefix: str) -> dict[str, Any]:
        self._names(fields, table, prefix)
        return {name: self.value(fields[name], value, f"{prefix}.{name}") for name, value in table.items()}

    def grid(self, fields: Mapping[str, Field], table: dict[str, Any], prefix: str) -> dict[str, list[Any]]:
        self._names(fields, table, prefix)
        grid = {}
        for name, values in table.items():
            where = f"{prefix}.{name}"
            if not isinstance(values, list) or not values:
                raise self.fail(where, f"expected a non-empty list of values, got {values!r}")
            checked = [self.value(fields[name], x, f"{where}[{i}]") for i, x in enumerate(values)]
            if len(set(map(repr, checked))) < len(checked):
                raise self.fail(where, "duplicate values")
            grid[name] = checked
        return grid

    def seeds(self, table: dict[str, Any], prefix: str) -> Sequence[int] | None:
        self.keys(table, SEED_KEYS, prefix + ".")
        if not table:
            return None
        if len(table) != 1:
            raise self.fail(prefix, "give either count or list, not both")
        if "count" in table:
            return range(self.value(Field(int, "seed count", low=1), table["count"], f"{prefix}.count"))
        seeds = table["list"]
        seed = Field(int, "seed", low=0)
        if not isinstance(seeds, list) or not seeds:
            raise self.fail(f"{prefix}.list", f"expected a non-empty list of seeds, got {seeds!r}")
        checked = [self.value(seed, s, f"{prefix}.list[{i}]") for i, s in enumerate(seeds)]
        if len(set(checked)) < len(checked):
            raise self.fail(f"{prefix}.list", "duplicate seeds")
        return checked

    def scales(self, fields: Mapping[str, Field], table: dict[str, Any]) -> dict[str, dict[str, Any]]:
        scales = {}
        for scale in table:
            prefix = f"scales.{scale}"
            if not re.fullmatch(r"[A-Za-z0-9_-]+", scale):
                raise self.fail(prefix, "scale names use letters, digits, '_' and '-'")
            raw = self.table(table, scale, "scales.")
            self.keys(raw, SCALE_KEYS, prefix + ".")
            over: dict[str, Any] = {
                "settings": self.settings(fields, self.table(raw, "settings", prefix + "."), prefix + ".settings"),
                "grid": self.grid(fields, self.table(raw, "grid", prefix + "."), prefix + ".grid"),
                "slurm": self.settings(SLURM_FIELDS, self.table(raw, "slurm", prefix + "."), prefix + ".slurm"),
            }
            seeds = self.seeds(self.table(raw, "seeds", prefix + "."), prefix + ".seeds")
            if seeds is not None:
                over["seeds"] = seeds
            for name in over["grid"]:
                if name in over["settings"]:
                    raise self.fail(f"{prefix}.grid.{name}", f"also set in [{prefix}.settings]; keep one")
            scales[scale] = over
        return scales

    def _names(self, fields: Mapping[str, Field], table: dict[str, Any], prefix: str) -> None:
        for name in table:
            if name in RESERVED:
                raise self.fail(f"{prefix}.{name}", f"'{name}' is set by the engine; use [seeds] or --scale")
        self.keys(table, fields, prefix + ".")
