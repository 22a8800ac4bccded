"""Result store of one experiment: one JSON record per finished run, written atomically.

Layout of ``<results>/<experiment>/``:

- ``runs/<run_id>.json``: the record of a finished run: ``id``, ``experiment``, ``kind``,
  ``scale``, ``settings`` (resolved, with seed and scale), ``status`` (ok, failed, diverged),
  ``metrics`` (series as lists), ``error`` (traceback of a failed run, else null),
  ``wall_time_s`` (of the last attempt), ``resumed`` (whether it continued from a checkpoint),
  ``finished_at`` (UTC ISO), ``host``, ``device``, ``versions``, ``git_revision``.
- ``checkpoints/<run_id>.pt``: latest checkpoint of a run that has not finished.
- ``submissions/<job_id>.json``: SLURM array submissions (run id -> array task id).
- ``logs/<task_id>/``: SLURM job logs written by submitit.
- ``<experiment>-<scale>.parquet`` / ``.csv``: compacted tables (``hsbench export`` / ``plot``).

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a crash or SIGKILL leaves either the old file or the new one, never a torn one.
Temporary files start with ``.`` and are never read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from hsbench.engine.spec import Run

DEFAULT_RESULTS = Path("results")
FINAL = ("ok", "diverged")  # statuses that a rerun skips; a failed run runs again
STATUSES = ("ok", "failed", "diverged")


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Store:
    """Records, checkpoints, submissions and logs of one experiment under ``results_dir``."""

    def __init__(self, results_dir: str | Path, experiment: str):
        self.experiment = experiment
        self.root = Path(results_dir).resolve() / experiment
        self.runs_dir = self.root / "runs"
        self.checkpoints_dir = self.root / "checkpoints"
        self.submissions_dir = self.root / "submissions"
        self.logs_dir = self.root / "logs"

    def write(self, record: dict[str, Any]) -> None:
        atomic_write(self.runs_dir / f"{record['id']}.json", json.dumps(record).encode())

    def read(self, run_id: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.runs_dir / f"{run_id}.json").read_text())
        except FileNotFoundError:
            return None

    def read_run(self, run: Run) -> dict[str, Any] | None:
        """The record of ``run``, or None if none is stored or it ran other settings (``Run.matches``)."""
        record = self.read(run.id)
        return record if record is not None and run.matches(record) else None

    def records(self) -> list[dict[str, Any]]:
        """All records, sorted by run id."""
        if not self.runs_dir.is_dir():
            return []
        return [json.loads(p.read_text()) for p in sorted(self.runs_dir.glob("[!.]*.json"))]

    def checkpoint_path(self, run_id: str) -> Path:
        return self.checkpoints_dir / f"{run_id}.pt"

    def write_submission(self, job_id: str, tasks: dict[str, str]) -> None:
        """Remember that SLURM array ``job_id`` runs each run id as the given array task id."""
        data = {"job_id": job_id, "tasks": tasks}
        atomic_write(self.submissions_dir / f"{job_id}.json", json.dumps(data).encode())

    def submitted_tasks(self) -> dict[str, str]:
        """Run id -> SLURM task id of its latest submission."""
        if not self.submissions_dir.is_dir():
            return {}
        paths = sorted(self.submissions_dir.glob("[!.]*.json"), key=lambda p: int(p.stem))
        return {run: task for p in paths for run, task in json.loads(p.read_text())["tasks"].items()}

    def frame(self, scale: str, run_ids: set[str] | None = None) -> pd.DataFrame:
        """Tidy table of the records at ``scale``, one row per run, restricted to ``run_ids`` if given.

        Columns: ``run_id``, ``status``, the settings, the metrics and provenance; series
        metrics stay lists in their cell (see ``hsbench.results.series``).
        """
        rows = []
        for rec in self.records():
            if rec["scale"] != scale or (run_ids is not None and rec["id"] not in run_ids):
                continue
            clash = rec["settings"].keys() & rec["metrics"].keys()
            if clash:
                raise ValueError(f"{self.runs_dir / rec['id']}.json: metrics named like settings: {sorted(clash)}")
            rows.append(
                {"run_id": rec["id"], "status": rec["status"]}
                | rec["settings"]
                | rec["metrics"]
                | {k: rec[k] for k in ("wall_time_s", "device", "git_revision", "error")}
            )
        return pd.DataFrame(rows)

    def compact(self, df: pd.DataFrame, scale: str, fmt: str) -> Path:
        """Write ``df`` as ``<experiment>-<scale>.parquet`` or ``.csv`` (lists as JSON) atomically."""
        path = self.root / f"{self.experiment}-{scale}.{fmt}"
        if fmt == "parquet":
            data = df.to_parquet(index=False)
        else:
            lists = [c for c in df.columns if is_series(df[c])]
            data = df.assign(**{c: df[c].map(json.dumps) for c in lists}).to_csv(index=False).encode()
        atomic_write(path, data)
        return path


def is_series(column) -> bool:
    """Whether a results column holds series (lists, one per run)."""
    return bool(column.map(lambda v: isinstance(v, list)).any())
