"""Execution of one run: seeding, the run context, status classification and the record.

``execute(run, options)`` is what every executor calls, in-process, in a pool worker or in a
SLURM job; both arguments are pickled there, so everything a run depends on (its kind's import
path, device, data directory) travels in them, never in the environment. It is idempotent: a
run already recorded ``ok`` or ``diverged`` is not run again, and a run interrupted at any
point (SIGKILL, preemption) has no record and continues from its last checkpoint when
executed again. A run being executed is claimed (``Store.claim``): another process asked to
execute it meanwhile skips it. A run stopped by :class:`Cancelled` (SLURM's SIGTERM, e.g.
``scancel``) is recorded ``cancelled``, keeps its checkpoint and runs again next time.
"""

from __future__ import annotations

import io
import json
import math
import platform
import random
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hsbench.engine.kind import Diverged, load_kind, run_device
from hsbench.engine.provenance import git_revision, versions
from hsbench.engine.spec import Run
from hsbench.engine.store import FINAL, Store, atomic_write

DEFAULT_CHECKPOINT_INTERVAL_S = 60.0
DEFAULT_DATA_DIR = Path("data")


class Cancelled(BaseException):
    """Raised in a run when its job is cancelled (SLURM's SIGTERM); a BaseException so that no kind catches it."""


@dataclass(frozen=True)
class RunOptions:
    """How one ``hsbench run`` executes its runs, the same for all of them.

    ``results_dir`` holds the records (one folder per experiment); ``device`` is a torch device
    (None: ``cuda`` if available and the kind uses it, else ``cpu``; see ``kind.run_device``);
    ``data_dir`` holds the torchvision data sets.
    """

    results_dir: Path
    checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S
    device: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR


@dataclass
class RunContext:
    """What a kind's ``run`` gets besides its settings: ids, device, data directory and a checkpoint API.

    Call ``checkpoint_due()`` at convenient points (e.g. every step) and, when it returns
    True, ``save_checkpoint(state)``; at the start, ``load_checkpoint()`` returns the last
    saved state or None. States are anything ``torch.save`` accepts; include RNG states so
    that a resumed run gives the same numbers as an uninterrupted one.
    """

    run_id: str
    seed: int
    device: str
    checkpoint_path: Path
    checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S
    data_dir: Path = DEFAULT_DATA_DIR  # torchvision data sets: `hsbench run --data-dir`
    resumed: bool = False  # whether load_checkpoint found a checkpoint
    _last_save: float = field(default_factory=time.monotonic)

    def checkpoint_due(self) -> bool:
        return time.monotonic() - self._last_save >= self.checkpoint_interval_s

    def save_checkpoint(self, state: Any) -> None:
        import torch  # here and below, not at the top: the command line reads this module's defaults

        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.checkpoint_path, buffer.getvalue())
        self._last_save = time.monotonic()

    def load_checkpoint(self) -> Any | None:
        import torch

        if not self.checkpoint_path.exists():
            return None
        self.resumed = True
        return torch.load(self.checkpoint_path, weights_only=False)


def finite(value: Any) -> bool:
    """Whether a metrics value (number, string, or nested lists and dicts of them) has no NaN or inf."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(finite(v) for v in value)
    return True


def execute(run: Run, options: RunOptions) -> str:
    """Run ``run`` unless already recorded ok/diverged, write its record, return its status.

    Returns ``running`` without running it when another process holds its claim.
    """
    store = Store(options.results_dir, run.experiment)
    done = store.read_run(run)
    if done is not None and done["status"] in FINAL:
        return done["status"]
    with store.claim(run.id) as claimed:
        if not claimed:
            return "running"
        done = store.read_run(run)  # the previous claimant may have finished it meanwhile
        if done is not None and done["status"] in FINAL:
            return done["status"]
        return _execute(run, options, store)


def _execute(run: Run, options: RunOptions, store: Store) -> str:
    import numpy as np
    import torch

    kind = load_kind(run.kind_path)
    seed = run.settings["seed"]
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    ctx = RunContext(
        run_id=run.id,
        seed=seed,
        device=options.device or "cpu",
        data_dir=options.data_dir,
        checkpoint_path=store.checkpoint_path(run.id),
        checkpoint_interval_s=options.checkpoint_interval_s,
    )
    start = time.perf_counter()
    error = None
    try:
        ctx.device = run_device(kind, options.device, torch.cuda.is_available())
        metrics = kind.run(dict(run.settings), ctx)
        json.dumps(metrics)  # a metric JSON cannot store fails the run here, not the record's write
        status = "ok" if finite(metrics) else "diverged"
    except Diverged as e:
        metrics, status = e.metrics, "diverged"
    except FloatingPointError as e:  # e.g. hsbench.optim.Diverged: a non-finite loss or update
        metrics, status, error = {}, "diverged", f"{type(e).__name__}: {e}"
    except Cancelled as e:
        metrics, status, error = {}, "cancelled", f"Cancelled: {e}"
    except Exception:
        metrics, status, error = {}, "failed", traceback.format_exc()
    store.write(
        {
            "id": run.id,
            "experiment": run.experiment,
            "kind": kind.name,
            "scale": run.settings["scale"],
            "settings": run.settings,
            "status": status,
            "metrics": metrics,
            "error": error,
            "wall_time_s": time.perf_counter() - start,
            "resumed": ctx.resumed,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "device": ctx.device,
            "versions": versions(),
            "git_revision": git_revision(),
        }
    )
    if status in FINAL:
        ctx.checkpoint_path.unlink(missing_ok=True)
    return status
