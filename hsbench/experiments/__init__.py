"""Registry of experiment kinds by name; a spec's ``kind`` must be one of ``KINDS``.

A new kind is one module of this package (a subclass of ``hsbench.engine.kind.ExperimentKind``)
plus one line below. The engine never imports this registry; ``hsbench.cli`` hands it over.
"""

from hsbench.engine.kind import ExperimentKind
from hsbench.experiments.approx_quality import ApproxQuality
from hsbench.experiments.diag_dominance import DiagDominance
from hsbench.experiments.optimizer_benchmark import OptimizerBenchmark
from hsbench.experiments.quadratic import Quadratic
from hsbench.experiments.rl import RLPerformance, RLRobustness, RLStability
from hsbench.experiments.update_time import UpdateTime

KINDS: dict[str, ExperimentKind] = {
    kind.name: kind
    for kind in (
        Quadratic(),
        ApproxQuality(),
        DiagDominance(),
        OptimizerBenchmark(),
        UpdateTime(),
        RLPerformance(),
        RLRobustness(),
        RLStability(),
    )
}
