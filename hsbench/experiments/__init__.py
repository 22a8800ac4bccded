"""Registry of experiment kinds by name; a spec's ``kind`` must be one of ``KINDS``.

A new kind is one module of this package (a subclass of ``hsbench.engine.kind.ExperimentKind``)
plus one line in ``PATHS``. ``KINDS`` maps each name to its kind, imported on first access
(``hsbench.engine.kind.load_kind``): listing the names, or a command that needs no kind (``hsbench
--help``), imports none of the kind modules; importing one imports neither torch nor pandas either
(see "Declaring a kind is cheap" in ``hsbench.engine.kind``). The engine never imports this
registry; ``hsbench.cli`` hands it over.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

from hsbench.engine.kind import ExperimentKind, load_kind

PATHS: dict[str, str] = {
    "quadratic": "hsbench.experiments.quadratic:Quadratic",
    "approx-quality": "hsbench.experiments.approx_quality:ApproxQuality",
    "diag-dominance": "hsbench.experiments.diag_dominance:DiagDominance",
    "optimizer-benchmark": "hsbench.experiments.optimizer_benchmark:OptimizerBenchmark",
    "update-time": "hsbench.experiments.update_time:UpdateTime",
    "rl-performance": "hsbench.experiments.rl:RLPerformance",
    "rl-robustness": "hsbench.experiments.rl:RLRobustness",
    "rl-stability": "hsbench.experiments.rl:RLStability",
}
"""Kind name -> ``'module:Class'`` import path."""


class Kinds(MutableMapping[str, ExperimentKind]):
    """Kind name -> kind instance, each kind's module imported when the kind is first looked up.

    Assigning an instance (e.g. a test's variant of a kind) replaces the registered one.
    """

    def __init__(self, paths: dict[str, str]):
        self._paths = dict(paths)
        self._replaced: dict[str, ExperimentKind] = {}

    def __getitem__(self, name: str) -> ExperimentKind:
        if name in self._replaced:
            return self._replaced[name]
        kind = load_kind(self._paths[name])  # KeyError for an unknown name
        if kind.name != name:
            raise RuntimeError(f"hsbench.experiments.PATHS: {self._paths[name]} is kind {kind.name!r}, not {name!r}")
        return kind

    def __setitem__(self, name: str, kind: ExperimentKind) -> None:
        self._replaced[name] = kind

    def __delitem__(self, name: str) -> None:
        if name in self._replaced:
            del self._replaced[name]
        else:
            del self._paths[name]

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._paths, *self._replaced]))

    def __len__(self) -> int:
        return len(set(self._paths) | set(self._replaced))


KINDS = Kinds(PATHS)
