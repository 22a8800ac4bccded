"""Executors: run a list of runs locally (in-process or a process pool) or on SLURM (submitit).

Each run writes its own record through ``runner.execute``, so an executor only dispatches
and reports progress. SLURM dispatch submits one job array and returns; ``wait_slurm``
follows it through the result store and ``squeue`` (never ``sacct``, which clusters without
accounting lack). SLURM jobs are submitit ``Checkpointable``: on preemption or timeout
submitit requeues them and the run continues from its last checkpoint; SLURM's SIGTERM
(``scancel``) stops the run, which is recorded ``cancelled``.

Pool workers watch the process that started them and exit when it is gone, so that killing
``hsbench run`` (even with SIGKILL) leaves no worker behind.
"""

from __future__ import annotations

import collections
import contextlib
import getpass
import io
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import submitit
import torch
from tqdm import tqdm

from hsbench.engine.runner import Cancelled, RunOptions, execute
from hsbench.engine.spec import Run
from hsbench.engine.store import FINAL, STATUSES, Store

POLL_S = 2.0  # seconds between polls of the result store and squeue while waiting
ARRAY_LIMIT = 1000  # tasks per job array: SLURM's default MaxArraySize (1001) allows indices 0..1000
ORPHAN_POLL_S = 0.2  # seconds between a pool worker's checks that the process that started it lives


class Interrupted(Exception):
    """Ctrl-C during ``run_local``; ``counts`` holds the statuses of the runs that finished."""

    def __init__(self, counts: collections.Counter):
        super().__init__("interrupted")
        self.counts = counts


class SubmitError(Exception):
    """SLURM refused a submission (e.g. unknown partition, too much memory, controller down); one line."""


class QueueUnavailable(Exception):
    """``squeue`` failed (e.g. the controller is down); one line."""


def run_local(runs: list[Run], options: RunOptions, jobs: int) -> collections.Counter:
    """Execute ``runs`` in this process (``jobs`` = 1) or in a pool of ``jobs`` processes; count statuses.

    Raises :class:`Interrupted` on Ctrl-C with the statuses of the runs that finished, after
    stopping the runs in flight (unrecorded; a rerun resumes them from their checkpoints) and
    the pool's workers, without starting the queued ones.
    """
    counts: collections.Counter = collections.Counter()
    with tqdm(total=len(runs), unit="run", desc="runs") as bar:

        def done(status: str) -> None:
            counts[status] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update()

        try:
            if jobs == 1:
                for run in runs:
                    done(execute(run, options))
            else:
                context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
                threads = max(1, (os.cpu_count() or 1) // jobs)  # share the cores instead of oversubscribing them
                pool = ProcessPoolExecutor(
                    jobs, mp_context=context, initializer=_start_worker, initargs=(os.getpid(), threads)
                )
                futures = []
                try:
                    futures = [pool.submit(execute, run, options) for run in runs]
                    for future in as_completed(futures):
                        done(future.result())
                except KeyboardInterrupt:
                    for worker in multiprocessing.active_children():  # the pool's workers (they ignore SIGINT)
                        worker.terminate()  # their runs stop unrecorded; checkpoints stay for the rerun
                    finished = [f for f in futures if f.done() and not f.cancelled() and f.exception() is None]
                    raise Interrupted(collections.Counter(f.result() for f in finished)) from None
                finally:  # the queued runs never start
                    pool.shutdown(wait=True, cancel_futures=True)
        except KeyboardInterrupt:
            raise Interrupted(counts) from None
    return counts


def _start_worker(parent: int, threads: int) -> None:
    """Pool worker initializer: ``threads`` torch threads, and exit as soon as ``parent`` is gone.

    Ctrl-C is the parent's to handle (it stops the workers): a worker ignores SIGINT, which a
    terminal sends to the whole process group.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        os._exit(1)  # the run's record is not written: it runs again next time

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


class SlurmRun(submitit.helpers.Checkpointable):
    """The callable a SLURM array task runs; submitit requeues it (same arguments) on preemption or timeout.

    SLURM's SIGTERM (``scancel``, or the end of a job's time that submitit did not requeue)
    stops the run: it is recorded ``cancelled`` (submitit's default would ignore the signal
    until SIGKILL follows).
    """

    def __call__(self, run: Run, options: RunOptions) -> str:
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", torch.get_num_threads())))
        signal.signal(signal.SIGTERM, _cancel)
        return execute(run, options)


def _cancel(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the record of the cancellation is being written
    raise Cancelled(f"SLURM sent {signal.Signals(signum).name} (scancel or the job's time limit)")


def submit_slurm(runs: list[Run], store: Store, params: dict[str, Any], options: RunOptions) -> list[str]:
    """Submit ``runs`` as job arrays of at most ARRAY_LIMIT tasks with SLURM ``params``; return their job ids."""
    executor = submitit.AutoExecutor(folder=store.logs_dir / "%j", cluster="slurm")
    executor.update_parameters(
        name=f"hsbench-{store.experiment}",
        timeout_min=params["time_min"],
        cpus_per_task=params["cpus_per_task"],
        mem_gb=params["mem_gb"],
        gpus_per_node=params["gpus_per_node"],
        slurm_array_parallelism=params["array_parallelism"],
        **({"slurm_partition": params["partition"]} if params["partition"] else {}),
    )
    job_ids: list[str] = []
    for first in range(0, len(runs), ARRAY_LIMIT):
        chunk = runs[first : first + ARRAY_LIMIT]
        n = len(chunk)
        created = _new_paths(store.root)
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's errors; ours is one line
                jobs = executor.map_array(SlurmRun(), chunk, [options] * n)
        except Exception as e:  # submitit's FailedJobError with sbatch's message, or OSError
            for path in sorted(created(), reverse=True):  # the pickles and script of the refused array
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            raise SubmitError(_sbatch_message(e, job_ids)) from None
        job_ids.append(jobs[0].job_id.split("_")[0])
        store.write_submission(job_ids[-1], {run.id: job.job_id for run, job in zip(chunk, jobs, strict=True)})
    return job_ids


def _new_paths(root: Path):
    """A function returning the paths under ``root`` (and ``root`` itself) created since this call."""
    ancestors = [p for p in (root.parent, root) if not p.exists()]
    before = set(root.rglob("*")) if root.exists() else set()

    def created() -> list[Path]:
        after = set(root.rglob("*")) if root.exists() else set()
        return sorted(after - before) + [p for p in ancestors if p.exists()]

    return created


def _sbatch_message(error: Exception, submitted: list[str]) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = next((line for line in lines if "sbatch: error:" in line), lines[-1] if lines else type(error).__name__)
    message = re.sub(r"^.*?sbatch: error: ", "", message)
    done = f" (arrays {' '.join(submitted)} were submitted before)" if submitted else ""
    return f"sbatch refused the job array: {message}{done}"


def queue_states() -> dict[str, str]:
    """SLURM task id -> ``pending`` or ``running`` for this user's queued jobs, one entry per array task.

    Raises :class:`QueueUnavailable` when ``squeue`` fails (e.g. the controller is down).
    """
    try:
        out = subprocess.run(
            ["squeue", "--noheader", "--array", "--user", getpass.getuser(), "--format", "%i|%T"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines() or [f"exit status {e.returncode}"]
        raise QueueUnavailable(f"squeue: {lines[-1].removeprefix('squeue: ')}") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise QueueUnavailable(f"squeue: {e}") from None
    states = {}
    for line in out.splitlines():
        task, state = line.strip().split("|")
        states[task] = "running" if state in ("RUNNING", "COMPLETING") else "pending"
    return states


def run_states(
    runs: list[Run], store: Store, records: Mapping[str, dict | None] | None = None
) -> tuple[dict[str, str], str | None]:
    """Run id -> state, and why the queue could not be read (None if it could or was not needed).
    ``records``: the runs' records (run id -> record or None) if the caller has read them already.

    A run's state is its record's status (ok, failed, diverged, cancelled) unless it is queued
    again, else pending / running from ``squeue``. A submitted run that left the queue without
    a record and without having started (no SLURM log: ``scancel`` while pending) is
    ``cancelled``; any other run without a record is ``missing``. When ``squeue`` fails (e.g.
    the controller is down), submitted runs without a record are ``unknown``. Without
    ``squeue`` at all (e.g. results copied off the cluster) nothing counts as queued or cancelled.
    """
    submitted = store.submitted_tasks()
    queued: dict[str, str] | None = None  # None: the queue was not read
    problem = None
    if shutil.which("squeue") and any(run.id in submitted for run in runs):
        try:
            queued = queue_states()
        except QueueUnavailable as e:
            problem = str(e)
    states = {}
    for run in runs:
        record = store.read_run(run) if records is None else records[run.id]
        task = submitted.get(run.id, "")
        if record is not None and (record["status"] in FINAL or task not in (queued or {})):
            states[run.id] = record["status"]
        elif queued is not None and task in queued:
            states[run.id] = queued[task]
        elif problem and task:
            states[run.id] = "unknown"
        elif queued is not None and task and not started(store, task):
            states[run.id] = "cancelled"
        else:
            states[run.id] = "missing"
    return states, problem


def started(store: Store, task: str) -> bool:
    """Whether SLURM started array task ``task``: it opened the task's log (``submit_slurm``'s folder)."""
    return any((store.logs_dir / task).glob("*_log.out"))


def wait_slurm(runs: list[Run], store: Store) -> dict[str, str]:
    """Block, with a progress bar, until no run is pending or running; return the final run states."""
    with tqdm(total=len(runs), unit="run", desc="SLURM runs") as bar:
        while True:
            states, problem = run_states(runs, store)
            if problem:
                raise QueueUnavailable(problem)
            counts = collections.Counter(states.values())
            bar.n = sum(counts[s] for s in STATUSES)
            bar.set_postfix(counts, refresh=False)
            bar.refresh()
            if not counts["pending"] and not counts["running"]:
                return states
            time.sleep(POLL_S)
