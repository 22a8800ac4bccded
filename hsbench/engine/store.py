"""Result store of one experiment: one JSON record per finished run, written atomically.

Layout of ``<results>/<experiment>/``:

- ``runs/<run_id>.json``: the record of a finished run: ``id``, ``experiment``, ``kind``,
  ``scale``, ``settings`` (resolved, with seed and scale), ``status`` (ok, failed, diverged,
  cancelled),
  ``metrics`` (series as lists), ``error`` (traceback of a failed run, else null),
  ``wall_time_s`` (of the last attempt), ``resumed`` (whether it continued from a checkpoint),
  ``finished_at`` (UTC ISO), ``host``, ``device``, ``versions``, ``git_revision``.
- ``checkpoints/<run_id>.pt``: latest checkpoint of a run that has not finished.
- ``claims/<run_id>.lock``: exists while a process executes the run (an exclusive ``flock``,
  released by the OS when that process dies), so that two ``hsbench run`` never run it twice.
- ``submissions/<job_id>.json``: SLURM array submissions (run id -> array task id).
- ``logs/<task_id>/``: SLURM job logs written by submitit.
- ``<experiment>-<scale>.parquet`` / ``.csv``: compacted tables (``hsbench export`` / ``plot``).

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a crash or SIGKILL leaves either the old file or the new one, never a torn one.
Temporary files start with ``.`` and are never read. A record that cannot be read (e.g. a
file truncated by a full disk or copied in part) is reported on stderr, naming the file, and
counts as missing, so that the next ``hsbench run`` replaces it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from hsbench.engine.spec import Run

DEFAULT_RESULTS = Path("results")
FINAL = ("ok", "diverged")  # statuses that a rerun skips; a failed or cancelled run runs again
STATUSES = ("ok", "failed", "diverged", "cancelled")
RECORD_KEYS = ("id", "scale", "settings", "status", "metrics")  # what every reader of a record relies on
_reported: set[Path] = set()  # unreadable records already reported by this process


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
        """The record stored for ``run_id``; None if there is none or it is unreadable (reported once)."""
        return read_record(self.runs_dir / f"{run_id}.json")

    def read_run(self, run: Run) -> dict[str, Any] | None:
        """The record of ``run``, or None if none is stored or it ran other settings (``Run.matches``)."""
        record = self.read(run.id)
        return record if record is not None and run.matches(record) else None

    def records(self) -> list[dict[str, Any]]:
        """All records, sorted by run id (a progress bar on stderr if reading takes over 2 s)."""
        from tqdm import tqdm

        if not self.runs_dir.is_dir():
            return []
        paths = sorted(self.runs_dir.glob("[!.]*.json"))
        records = (read_record(p) for p in tqdm(paths, desc="reading records", unit="record", delay=2, leave=False))
        return [r for r in records if r is not None]

    def checkpoint_path(self, run_id: str) -> Path:
        return self.checkpoints_dir / f"{run_id}.pt"

    @contextlib.contextmanager
    def claim(self, run_id: str) -> Iterator[bool]:
        """Hold the exclusive claim on ``run_id`` while in the block; yields False if another process holds it.

        The claim is an ``flock`` on ``claims/<run_id>.lock``: the OS releases it when its holder
        dies (even by SIGKILL). The file (and the folder, once empty) is removed on release; a
        claimant that locked a file removed meanwhile tries again on a new one.
        """
        path = self.root / "claims" / f"{run_id}.lock"
        while True:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed by a releasing claimant meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the previous holder removed the file after we opened it
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)
            with contextlib.suppress(OSError):  # the last claim leaves no empty folder; others may remain
                path.parent.rmdir()

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
        import pandas as pd  # here, not at the top: commands that read no table start without it

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


def read_record(path: Path) -> dict[str, Any] | None:
    """The record in ``path``; None if there is none, or if it is unreadable, reported once on stderr."""
    try:
        record = json.loads(path.read_bytes())
        if isinstance(record, dict) and all(key in record for key in RECORD_KEYS):
            return record
        problem = "not a run record"
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or UTF-8
        problem = str(e).splitlines()[0] if str(e) else type(e).__name__
    if path not in _reported:
        _reported.add(path)
        print(f"hsbench: warning: {path}: unreadable record ({problem}); counted as missing", file=sys.stderr)
    return None


def is_series(column) -> bool:
    """Whether a results column holds series (lists, one per run)."""
    return bool(column.map(lambda v: isinstance(v, list)).any())
