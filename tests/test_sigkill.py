"""A local sweep killed with SIGKILL at random moments, then rerun, equals an uninterrupted one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

from conftest import HSBENCH, REPO, hsbench, outcomes

from hsbench.engine.runner import RunOptions, execute
from hsbench.engine.spec import load_spec
from hsbench.experiments import KINDS

# Four runs of one or two seconds each, with gradient noise so that resuming must restore the RNG.
SPEC = """
kind = "quadratic"
[settings]
dim = 20
steps = 12000
noise = 0.1
[grid]
optimizer = ["sgd", "adam"]
[seeds]
count = 2
"""


def execute_all(runs, results_dir) -> None:
    for run in runs:
        assert execute(run, RunOptions(results_dir)) == "ok"


def newest_change(folder) -> float:
    newest = 0.0
    for path in folder.rglob("*"):
        try:
            newest = max(newest, path.stat().st_mtime)
        except FileNotFoundError:  # a temporary file renamed meanwhile
            continue
    return newest


def test_sigkill_then_rerun_gives_identical_results(write_spec, tmp_path):
    spec = write_spec(SPEC, name="killed")
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    args = ["run", spec, "--jobs", "2", "--checkpoint-every", "0.05"]
    rng = random.Random(0)
    kills = 0
    for _ in range(5):
        started = time.time()
        proc = subprocess.Popen(
            [str(HSBENCH), *map(str, args), "--results", str(killed)],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: the kill takes the pool workers too
        )
        # kill at a random moment once this attempt has written something (checkpoint or record)
        while proc.poll() is None and newest_change(killed) < started:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.2))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills == 5, "the sweep finished before five kills; make its runs longer"

    hsbench(*args, "--results", killed)
    execute_all(load_spec(spec, KINDS).runs(), reference)  # uninterrupted, sequential, in this process
    resumed = outcomes(killed, "killed")
    assert len(resumed) == 4 and {status for status, _, _ in resumed.values()} == {"ok"}
    assert resumed == outcomes(reference, "killed")
    assert not list((killed / "killed" / "checkpoints").glob("[!.]*"))
