"""Agreement of two results folders on one experiment: does a fresh run reproduce the reference?

``hsbench check SPEC --scale S --against DIR`` runs the spec's missing runs into a fresh results
folder and compares them, run by run, with the records of the same run ids in ``DIR`` (a run id
hashes the kind and the settings, so matching ids ran the same settings; see
``hsbench.engine.spec.run_id``). Compared are the numeric metrics of runs whose status is the
same on both sides: numbers, and lists of numbers entry by entry (strings, such as a data
source's description, are not compared). The relative difference of two values is

    |fresh - reference| / max(|fresh|, |reference|)      (0 when |fresh - reference| <= atol)

and they agree when it is at most ``rtol``. Metrics are reported in groups, one line each: a metric
``name/method`` belongs to group ``method`` (the approximation or optimizer it measures), any
other metric is a group of its own.

Tolerance: the runs are deterministic for a seed on the CPU (float64 where the kind says so),
so on the machine that made the reference they agree exactly; the default ``rtol = 1e-6`` leaves
room for another BLAS or summation order (float64 rounding differs around 1e-12, amplified along
a few hundred SGD steps) while a changed algorithm, random stream or data set shows as a
difference of percents. Timings (kind ``update-time``) do not reproduce; check them with a loose
``--rtol`` or not at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any

from hsbench.engine.spec import Run
from hsbench.engine.store import Store

DEFAULT_RTOL = 1e-6
DEFAULT_ATOL = 1e-12


@dataclass
class Group:
    """Agreement of one group of metrics over every compared run."""

    max_rel_diff: float = 0.0
    values: int = 0
    worst: str = ""  # "run_id metric" of the largest difference

    def passed(self, rtol: float) -> bool:
        return self.max_rel_diff <= rtol


@dataclass
class Agreement:
    """The comparison of a fresh results folder with a reference one, for one list of runs."""

    rtol: float
    atol: float
    groups: dict[str, Group] = field(default_factory=dict)
    compared: int = 0
    missing_fresh: list[str] = field(default_factory=list)  # run ids without a fresh record
    missing_reference: list[str] = field(default_factory=list)  # run ids without a reference record
    other_status: list[str] = field(default_factory=list)  # "id: fresh status vs reference status"
    other_shape: list[str] = field(default_factory=list)  # "id metric": missing on one side, or other lengths

    @property
    def passed(self) -> bool:
        return self.compared > 0 and not (
            self.missing_fresh
            or self.missing_reference
            or self.other_status
            or self.other_shape
            or any(not g.passed(self.rtol) for g in self.groups.values())
        )

    def lines(self) -> list[str]:
        """One line per group, then one per kind of problem, then the verdict."""
        width = max((len(name) for name in self.groups), default=0)
        out = [
            f"{name:{width}}  max rel diff {g.max_rel_diff:.2e} over {g.values} values  "
            + ("ok" if g.passed(self.rtol) else f"FAIL (worst: {g.worst})")
            for name, g in self.groups.items()
        ]
        problems = (
            ("no fresh record", self.missing_fresh),
            ("no reference record", self.missing_reference),
            ("status differs", self.other_status),
            ("metric missing on one side or of another length", self.other_shape),
        )
        out += [f"{what} ({len(ids)}): {' '.join(ids)}" for what, ids in problems if ids]
        verdict = "reproduces" if self.passed else "DOES NOT reproduce"
        out.append(
            f"{verdict} the reference: {self.compared} runs compared, tolerance rtol={self.rtol:g} atol={self.atol:g}"
        )
        return out


def group_of(metric: str) -> str:
    """``'l1/hesscale'`` -> ``'hesscale'``; a metric without a slash is its own group."""
    return metric.rpartition("/")[2]


def numbers(value: Any) -> list[float] | None:
    """The numbers of a metric value, flattened (nested lists entry by entry); None if not numeric."""
    if isinstance(value, Real) and not isinstance(value, bool):
        return [float(value)]
    if isinstance(value, list):
        parts = [numbers(v) for v in value]
        return None if any(p is None for p in parts) else [x for p in parts for x in p or ()]
    return None


def relative_difference(a: float, b: float, atol: float) -> float:
    """``|a - b| / max(|a|, |b|)``, 0 within ``atol``, inf when only one is NaN."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if a == b or abs(a - b) <= atol:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b))


def compare(
    runs: Sequence[Run], fresh: Store, reference: Store, rtol: float = DEFAULT_RTOL, atol: float = DEFAULT_ATOL
) -> Agreement:
    """Compare the records of ``runs`` in ``fresh`` with those in ``reference`` (same run ids)."""
    agreement = Agreement(rtol, atol)
    for run in runs:
        new, ref = fresh.read_run(run), reference.read_run(run)
        if new is None:
            agreement.missing_fresh.append(run.id)
        if ref is None:
            agreement.missing_reference.append(run.id)
        if new is None or ref is None:
            continue
        if new["status"] != ref["status"]:
            agreement.other_status.append(f"{run.id}: {new['status']} vs {ref['status']}")
            continue
        agreement.compared += 1
        for metric in sorted(new["metrics"].keys() | ref["metrics"].keys()):
            _compare_metric(agreement, run.id, metric, new["metrics"].get(metric), ref["metrics"].get(metric))
    return agreement


def _compare_metric(agreement: Agreement, run_id: str, metric: str, new: Any, ref: Any) -> None:
    if isinstance(new, str) or isinstance(ref, str):
        return  # descriptions, not numbers
    new_values, ref_values = numbers(new), numbers(ref)
    if new_values is None and ref_values is None:
        return
    if new_values is None or ref_values is None or len(new_values) != len(ref_values):
        agreement.other_shape.append(f"{run_id}:{metric}")
        return
    group = agreement.groups.setdefault(group_of(metric), Group())
    for a, b in zip(new_values, ref_values, strict=True):
        diff = relative_difference(a, b, agreement.atol)
        group.values += 1
        if diff > group.max_rel_diff:
            group.max_rel_diff, group.worst = diff, f"{run_id} {metric}"
