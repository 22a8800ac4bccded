"""Executors: run a list of runs locally (in-process or a process pool) or on SLURM (submitit).

Each run writes its own record through ``runner.execute``, so an executor only dispatches
and reports progress. SLURM dispatch submits one job array and returns; ``wait_slurm``
follows it through the result store and ``squeue`` (never ``sacct``, which clusters without
accounting lack). SLURM jobs are submitit ``Checkpointable``: on preemption or timeout
submitit requeues them and the run continues from its last checkpoint.
"""

from __future__ import annotations

import collections
import getpass
import multiprocessing
import os
import shutil
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import submitit
import torch
from tqdm import tqdm

from hsbench.engine.runner import RunOptions, execute
from hsbench.engine.spec import Run
from hsbench.engine.store import STATUSES, Store

POLL_S = 2.0  # seconds between polls of the result store and squeue while waiting
ARRAY_LIMIT = 1000  # tasks per job array: SLURM's default MaxArraySize (1001) allows indices 0..1000


def run_local(runs: list[Run], options: RunOptions, jobs: int) -> collections.Counter:
    """Execute ``runs`` in this process (``jobs`` = 1) or in a pool of ``jobs`` processes; count statuses."""
    counts: collections.Counter = collections.Counter()
    with tqdm(total=len(runs), unit="run", desc="runs") as bar:

        def done(status: str) -> None:
            counts[status] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update()

        if jobs == 1:
            for run in runs:
                done(execute(run, options))
        else:
            context = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
            threads = max(1, (os.cpu_count() or 1) // jobs)  # share the cores instead of oversubscribing them
            with ProcessPoolExecutor(
                jobs, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)
            ) as pool:
                futures = [pool.submit(execute, run, options) for run in runs]
                for future in as_completed(futures):
                    done(future.result())
    return counts


class SlurmRun(submitit.helpers.Checkpointable):
    """The callable a SLURM array task runs; submitit requeues it (same arguments) on preemption or timeout."""

    def __call__(self, run: Run, options: RunOptions) -> str:
        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", torch.get_num_threads())))
        return execute(run, options)


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
    job_ids = []
    for first in range(0, len(runs), ARRAY_LIMIT):
        chunk = runs[first : first + ARRAY_LIMIT]
        n = len(chunk)
        jobs = executor.map_array(SlurmRun(), chunk, [options] * n)
        job_ids.append(jobs[0].job_id.split("_")[0])
        store.write_submission(job_ids[-1], {run.id: job.job_id for run, job in zip(chunk, jobs, strict=True)})
    return job_ids


def queue_states() -> dict[str, str]:
    """SLURM task id -> ``pending`` or ``running`` for this user's queued jobs, one entry per array task."""
    out = subprocess.run(
        ["squeue", "--noheader", "--array", "--user", getpass.getuser(), "--format", "%i|%T"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    states = {}
    for line in out.splitlines():
        task, state = line.strip().split("|")
        states[task] = "running" if state in ("RUNNING", "COMPLETING") else "pending"
    return states


def run_states(runs: list[Run], store: Store) -> dict[str, str]:
    """Run id -> ok / failed / diverged from its record, pending / running from squeue, else missing.

    Without ``squeue`` (e.g. results copied off the cluster) nothing counts as queued.
    """
    submitted = store.submitted_tasks()
    queued = queue_states() if shutil.which("squeue") and any(run.id in submitted for run in runs) else {}
    states = {}
    for run in runs:
        record = store.read_run(run)
        if record is not None and (record["status"] != "failed" or submitted.get(run.id) not in queued):
            states[run.id] = record["status"]
        else:
            states[run.id] = queued.get(submitted.get(run.id, ""), "missing")
    return states


def wait_slurm(runs: list[Run], store: Store) -> dict[str, str]:
    """Block, with a progress bar, until no run is pending or running; return the final run states."""
    with tqdm(total=len(runs), unit="run", desc="SLURM runs") as bar:
        while True:
            states = run_states(runs, store)
            counts = collections.Counter(states.values())
            bar.n = sum(counts[s] for s in STATUSES)
            bar.set_postfix(counts, refresh=False)
            bar.refresh()
            if not counts["pending"] and not counts["running"]:
                return states
            time.sleep(POLL_S)
