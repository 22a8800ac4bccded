"""SLURM dispatch on a real single-node cluster started by slurm/start-cluster.sh.

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge (``.ci/run``
installs them). Skipped elsewhere, except under CI (CI=true), where it fails instead.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import submitit
from conftest import REPO, hsbench, outcomes

from hsbench.cli import main
from hsbench.engine import executors
from hsbench.engine.spec import load_spec
from hsbench.experiments import KINDS

SPEC = """
kind = "quadratic"
[settings]
optimizer = "sgd"
[grid]
lr = [0.01, 0.5]
fail_at_step = [-1, 10]
[scales.smoke.settings]
dim = 5
steps = 30
[slurm]
time_min = 5
mem_gb = 1
"""
# lr 0.01 without failure is ok, with fail_at_step = 10 it fails; lr 0.5 diverges before step 10.


def wait_for(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.2)


def cluster_running() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm_cluster():
    missing = [c for c in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(c) is None]
    if missing or os.geteuid() != 0:
        why = f"needs root and SLURM ({', '.join(missing) or 'not root'} missing); see slurm/start-cluster.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(f"the real-SLURM test must run in CI: {why}")
        pytest.skip(why)
    already = cluster_running()
    start = subprocess.run(["bash", REPO / "slurm" / "start-cluster.sh"], capture_output=True, text=True)
    assert start.returncode == 0, start.stdout + start.stderr
    yield
    if not already:
        stop = subprocess.run(["bash", REPO / "slurm" / "stop-cluster.sh"], capture_output=True, text=True)
        assert stop.returncode == 0, stop.stdout + stop.stderr


def test_slurm_sweep_equals_local_run(slurm_cluster, write_spec, tmp_path, monkeypatch, capsys):
    spec = write_spec(SPEC, name="onslurm")
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    common = ["--scale", "smoke"]

    monkeypatch.setattr(executors, "ARRAY_LIMIT", 3)  # split the 4 runs into two arrays
    assert main(["run", str(spec), *common, "--results", str(on_slurm), "--executor", "slurm"]) == 0
    submitted = capsys.readouterr()
    assert "submitted SLURM array job(s)" in submitted.out  # returned once submitted, without --wait
    assert len(list((on_slurm / "onslurm" / "submissions").glob("*.json"))) == 2
    waited = hsbench("run", spec, *common, "--results", on_slurm, "--executor", "slurm", "--wait", check_rc=1)
    assert "1 ok, 1 failed, 2 diverged" in waited.stdout
    for err in (submitted.err, waited.stderr):
        assert "sacct" not in err  # no accounting on this cluster, and no warnings about it

    status = hsbench("status", spec, *common, "--results", on_slurm, check_rc=1).stdout  # 1: a run failed
    assert "ok        1" in status and "failed    1" in status and "missing   0" in status
    assert "RuntimeError: fail_at_step=10 reached" in status
    assert list((on_slurm / "onslurm" / "logs").glob("*_0/*_log.out"))

    hsbench("run", spec, *common, "--results", local, check_rc=1)
    from_slurm = outcomes(on_slurm, "onslurm")
    assert len(from_slurm) == 4
    assert from_slurm == outcomes(local, "onslurm")


LONG = """
kind = "quadratic"
[settings]
dim = 20
steps = 15000
noise = 0.1
optimizer = "adam"
"""


def slurm_config(name: str) -> str:
    """A setting of the running slurmctld as ``scontrol show config`` prints it (e.g. MinJobAge: '300 sec')."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    return next(line.split("=", 1)[1].strip() for line in out.splitlines() if line.split("=")[0].strip() == name)


def job_field(job: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    return next(word.split("=", 1)[1] for word in out.split() if word.startswith(f"{name}="))


def queue_state(job: str) -> str:
    """The job's state as squeue shows it: COMPLETING (not PENDING) while its first run is still ending."""
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def skip_requeue_delay(job: str) -> None:
    """Let the requeued ``job`` start now instead of after SLURM's requeue delay.

    The kill of the job's first run revoked its credential in slurmd for the rest of that
    second: a restart within it is refused ("Killing non-startable batch JobId=...: Job
    credential revoked") and the job leaves the queue for good, which SLURM's requeue delay
    (reason BeginTime) rules out. So, once the first run has ended (PENDING, no longer
    COMPLETING), the test waits into the next second before starting the job.
    """
    time.sleep(1.1 - time.time() % 1)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def test_preempted_job_is_requeued_and_continues_from_its_checkpoint(slurm_cluster, write_spec, tmp_path):
    spec = write_spec(LONG, name="preempted")
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    hsbench("run", spec, "--results", on_slurm, "--executor", "slurm", "--checkpoint-every", "0.2")
    (submission,) = (on_slurm / "preempted" / "submissions").glob("*.json")
    (task,) = json.loads(submission.read_text())["tasks"].values()
    checkpoints = on_slurm / "preempted" / "checkpoints"
    wait_for(lambda: any(checkpoints.glob("*.pt")), "a first checkpoint")

    # what SLURM sends before preempting or timing out a job; submitit checkpoints and requeues
    subprocess.run(["scancel", "--signal=USR2", task], check=True)
    wait_for(lambda: job_field(task, "Restarts") == "1" and queue_state(task) == "PENDING", "the requeue")
    skip_requeue_delay(task)
    hsbench("run", spec, "--results", on_slurm, "--executor", "slurm", "--wait")

    hsbench("run", spec, "--results", local)
    assert outcomes(on_slurm, "preempted") == outcomes(local, "preempted")
    log = next((on_slurm / "preempted" / "logs").glob(f"{task}/*_log.out")).read_text()
    assert log.count("Starting with JobEnvironment") == 2
    record = json.loads(next((on_slurm / "preempted" / "runs").glob("*.json")).read_text())
    assert record["resumed"] and record["status"] == "ok"


def test_sbatch_refusal_is_one_line_and_leaves_nothing(slurm_cluster, write_spec, tmp_path):
    spec = write_spec(SPEC, name="refused")
    res = tmp_path / "res"
    refused = hsbench(
        "run", spec, "--scale", "smoke", "--results", res, "--executor", "slurm", "--partition", "nosuch", check_rc=1
    )
    (line,) = refused.stderr.strip().splitlines()
    assert line == "hsbench: error: sbatch refused the job array: invalid partition specified: nosuch"
    assert not res.exists() or not list(res.rglob("*"))  # no pickles, scripts or submissions


def test_sbatch_refusing_too_much_memory_is_one_line_and_leaves_nothing(slurm_cluster, write_spec, tmp_path):
    spec = write_spec(SPEC.replace("mem_gb = 1", "mem_gb = 100000"), name="toobig")  # 100 TB: no node has it
    res = tmp_path / "res"
    refused = hsbench("run", spec, "--scale", "smoke", "--results", res, "--executor", "slurm", check_rc=1)
    (line,) = refused.stderr.strip().splitlines()
    assert line == "hsbench: error: sbatch refused the job array: Memory specification can not be satisfied"
    assert not res.exists() or not list(res.rglob("*"))


def stop_controller() -> None:
    state = os.environ.get("HSBENCH_SLURM_STATE", "/var/spool/hsbench-slurm")
    pid = int(Path(state, "slurmctld.pid").read_text())
    os.kill(pid, 15)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), "slurmctld exit", timeout_s=20)


def start_controller() -> None:
    start = subprocess.run(["bash", REPO / "slurm" / "start-cluster.sh"], capture_output=True, text=True)
    assert start.returncode == 0, start.stdout + start.stderr


def test_sbatch_without_the_controller_is_one_line_and_leaves_nothing(slurm_cluster, write_spec, tmp_path):
    spec = write_spec(SPEC, name="noctldrun")
    res = tmp_path / "res"
    stop_controller()
    try:
        refused = hsbench("run", spec, "--scale", "smoke", "--results", res, "--executor", "slurm", check_rc=None)
    finally:
        start_controller()
    (line,) = refused.stderr.strip().splitlines()
    reason = "Batch job submission failed: Unable to contact slurm controller (connect failure)"
    assert line == f"hsbench: error: sbatch refused the job array: {reason}"
    assert refused.returncode == 1
    assert not res.exists() or not list(res.rglob("*"))


def test_status_without_the_controller_shows_the_records(slurm_cluster, write_spec, tmp_path):
    spec = write_spec(SPEC, name="noctld")
    res = tmp_path / "res"
    hsbench("run", spec, "--scale", "smoke", "--results", res, check_rc=1)  # records, stored locally
    runs = sorted((res / "noctld" / "runs").glob("*.json"))
    runs[0].unlink()  # ... but one of them was submitted and has no record yet
    submission = {"job_id": "999999", "tasks": {runs[0].stem: "999999_0"}}
    (res / "noctld" / "submissions").mkdir()
    (res / "noctld" / "submissions" / "999999.json").write_text(json.dumps(submission))
    stop_controller()
    try:
        status = hsbench("status", spec, "--scale", "smoke", "--results", res, check_rc=None)
    finally:
        start_controller()
    assert "Traceback" not in status.stderr
    assert "unknown   1" in status.stdout and "missing   0" in status.stdout
    assert "the SLURM queue could not be read (squeue: " in status.stdout
    assert status.returncode == 1  # one stored run failed


def test_a_cancelled_job_is_shown_cancelled_and_runs_again(slurm_cluster, write_spec, tmp_path):
    spec = write_spec(LONG, name="cancelled")
    res = tmp_path / "res"
    hsbench("run", spec, "--results", res, "--executor", "slurm", "--checkpoint-every", "0.2")
    (submission,) = (res / "cancelled" / "submissions").glob("*.json")
    (task,) = json.loads(submission.read_text())["tasks"].values()
    wait_for(lambda: any((res / "cancelled" / "checkpoints").glob("*.pt")), "a first checkpoint")
    subprocess.run(["scancel", task], check=True)
    records = res / "cancelled" / "runs"
    wait_for(lambda: any(records.glob("*.json")), "the record of the cancelled run", timeout_s=30)
    (record,) = [json.loads(p.read_text()) for p in records.glob("*.json")]
    assert record["status"] == "cancelled" and "SIGTERM" in record["error"]
    wait_for(lambda: task not in executors.queue_states(), "the job to leave the queue", timeout_s=40)
    status = hsbench("status", spec, "--results", res, check_rc=1)
    assert "cancelled 1" in status.stdout
    rerun = hsbench("run", spec, "--results", res, "--executor", "slurm")
    assert "submitted SLURM array job(s)" in rerun.stdout
    subprocess.run(["scancel", "--name", "hsbench-cancelled"], check=True)


def test_a_job_cancelled_while_pending_is_shown_cancelled_and_runs_again(
    slurm_cluster, write_spec, tmp_path, monkeypatch
):
    spec = write_spec(LONG, name="cancelledpending")
    res = tmp_path / "res"
    update_parameters = submitit.AutoExecutor.update_parameters

    def begin_in_an_hour(self, **params):  # sbatch --begin: the job stays pending
        update_parameters(self, **params, slurm_additional_parameters={"begin": "now+1hour"})

    monkeypatch.setattr(submitit.AutoExecutor, "update_parameters", begin_in_an_hour)
    assert main(["run", str(spec), "--results", str(res), "--executor", "slurm"]) == 0
    monkeypatch.undo()
    (submission,) = (res / "cancelledpending" / "submissions").glob("*.json")
    (task,) = json.loads(submission.read_text())["tasks"].values()
    assert executors.queue_states()[task] == "pending"
    subprocess.run(["scancel", task], check=True)
    wait_for(lambda: task not in executors.queue_states(), "the job to leave the queue", timeout_s=40)
    status = hsbench("status", spec, "--results", res, check_rc=1)
    assert "cancelled 1" in status.stdout and "missing   0" in status.stdout
    assert "left the SLURM queue before it started" in status.stdout
    rerun = hsbench("run", spec, "--results", res, "--executor", "slurm")
    assert "1 cancelled" in rerun.stdout and "submitted SLURM array job(s)" in rerun.stdout
    subprocess.run(["scancel", "--name", "hsbench-cancelledpending"], check=True)


def default_partition() -> str:
    """The cluster's default partition (sinfo marks it with '*')."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout
    return next(p.removesuffix("*") for p in out.split() if p.endswith("*"))


def set_partition(partition: str, state: str) -> None:
    subprocess.run(["scontrol", "update", f"PartitionName={partition}", f"State={state}"], check=True)


def job_records() -> int:
    """Jobs slurmctld holds, ended ones included until MinJobAge; each array task counts, as for MaxJobCount."""
    out = subprocess.run(["scontrol", "show", "job", "-o"], capture_output=True, text=True, check=True).stdout
    count = 0
    for line in out.splitlines():
        tasks = next((w.split("=")[1].split("%")[0] for w in line.split() if w.startswith("ArrayTaskId=")), "0")
        for part in tasks.split(","):  # e.g. 0-999 or 0-99:2 or 7
            bounds, _, step = part.partition(":")
            first, _, last = bounds.partition("-")
            count += len(range(int(first), int(last or first) + 1, int(step or 1)))
    return count


def minutes(limit: str) -> int:
    """squeue's time limit (M:SS, H:MM:SS or D-HH:MM:SS) in minutes."""
    days, _, clock = limit.rpartition("-")
    hours, mins, _ = ([0, 0, 0] + [int(x) for x in clock.split(":")])[-3:]
    return int(days or 0) * 1440 + hours * 60 + mins


def gigabytes(memory: str) -> float:
    """squeue's minimum memory (e.g. 4G, 500M, 0: megabytes without a unit) in GB of 1024 MB, as submitit's."""
    number, unit = (memory[:-1], memory[-1]) if memory[-1].isalpha() else (memory, "M")
    return float(number) * {"M": 1 / 1024, "G": 1, "T": 1024}[unit]


def test_the_paper_sweep_of_figure5_is_submitted_whole(slurm_cluster, tmp_path):
    """`hsbench run figure5 --scale paper --executor slurm` queues every run of the spec, none runs.

    The default partition is DOWN while the test runs: SLURM accepts the arrays but starts no
    task. The arrays are also held once submitted, so that a test killed after the submission
    leaves nothing that would train when the partition comes UP again (a restart of slurmctld
    brings it UP, and so does slurm/start-cluster.sh). The cleanup cancels every job of the sweep's
    name (hsbench-figure5 on this test cluster), recorded or not, then brings the partition back UP.
    """
    spec = load_spec(REPO / "experiments" / "figure5.toml", KINDS)
    runs = spec.runs("paper")
    scaled = spec.resolve("paper")
    assert len(runs) == math.prod(map(len, scaled.grid.values())) * len(scaled.seeds)
    slurm = scaled.slurm
    res = tmp_path / "res"
    submissions = res / "figure5" / "submissions"
    partition = default_partition()
    limit = int(slurm_config("MaxJobCount"))
    if limit - job_records() < len(runs):  # sbatch would retry for minutes, then fail
        wait = slurm_config("MinJobAge")
        pytest.fail(
            f"slurmctld (MaxJobCount {limit}) holds too many jobs to take {len(runs)} more; ended ones go after "
            f"MinJobAge ({wait}); slurm/start-cluster.sh sets MaxJobCount 50000 (it restarts a running slurmctld)"
        )

    def submitted() -> dict[str, dict[str, str]]:
        """Array job id -> (run id -> array task), as hsbench recorded each submitted array."""
        found = (json.loads(p.read_text()) for p in submissions.glob("*.json")) if submissions.is_dir() else ()
        return {s["job_id"]: s["tasks"] for s in sorted(found, key=lambda s: int(s["job_id"]))}

    set_partition(partition, "DOWN")
    try:
        out = hsbench("run", "figure5", "--scale", "paper", "--executor", "slurm", "--results", res).stdout
        arrays = submitted()
        subprocess.run(["scontrol", "hold", ",".join(arrays)], check=True)

        assert f"figure5 (scale paper): {len(runs)} runs: {len(runs)} missing" in out
        assert f"submitted SLURM array job(s) {' '.join(arrays)} ({len(runs)} tasks)" in out
        tasks = {run_id: task for array in arrays.values() for run_id, task in array.items()}
        assert sorted(tasks) == sorted(run.id for run in runs)  # every run of the sweep, once

        queue = subprocess.run(
            ["squeue", "-h", "--array", "-j", ",".join(arrays), "-o", "%i|%T|%l|%C|%m|%j"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        queued = {}
        for line in queue.splitlines():
            task, state, limit, cpus, memory, name = line.split("|")
            queued[task] = state
            assert (minutes(limit), int(cpus), gigabytes(memory)) == (
                slurm["time_min"],
                slurm["cpus_per_task"],
                slurm["mem_gb"],
            ), line
            assert name == "hsbench-figure5"
        assert sorted(queued) == sorted(tasks.values()) and set(queued.values()) == {"PENDING"}
        for array, array_tasks in arrays.items():  # task indices 0..n-1, at most ARRAY_LIMIT per array
            assert len(array_tasks) <= executors.ARRAY_LIMIT
            assert sorted(int(t.split("_")[1]) for t in array_tasks.values()) == list(range(len(array_tasks)))
            assert job_field(array, "ArrayTaskThrottle") == str(slurm["array_parallelism"])

        status = hsbench("status", "figure5", "--scale", "paper", "--results", res).stdout
        assert f"figure5 (scale paper): {len(runs)} runs" in status
        assert f"pending   {len(runs)}\n" in status and "running   0\n" in status and "missing   0\n" in status
    finally:
        try:  # every array of the sweep, also one that sbatch accepted and hsbench did not record
            subprocess.run(["scancel", "--name", "hsbench-figure5"], check=True)
            left = lambda: subprocess.run(["squeue", "-h", "--name", "hsbench-figure5"], capture_output=True).stdout  # noqa: E731
            wait_for(lambda: not left(), "scancel")
        finally:  # only once nothing of the sweep is left to start; slurm/start-cluster.sh also brings it UP
            set_partition(partition, "UP")
