"""SLURM dispatch on a real single-node cluster started by slurm/start-cluster.sh.

Needs root and the Debian packages slurmctld, slurmd, slurm-client and munge (``.ci/run``
installs them). Skipped elsewhere, except under CI (CI=true), where it fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO, hsbench, outcomes

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


def cluster_running() -> bool:
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0 if shutil.which("sinfo") else False


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


def test_slurm_sweep_equals_local_run(slurm_cluster, write_spec, tmp_path):
    spec = write_spec(SPEC, name="onslurm")
    on_slurm, local = tmp_path / "slurm", tmp_path / "local"
    common = ["--scale", "smoke"]

    submitted = hsbench("run", spec, *common, "--results", on_slurm, "--executor", "slurm")
    assert "submitted SLURM array job" in submitted.stdout  # returned once submitted, without --wait
    waited = hsbench("run", spec, *common, "--results", on_slurm, "--executor", "slurm", "--wait", check_rc=1)
    assert "1 ok, 1 failed, 2 diverged" in waited.stdout
    for proc in (submitted, waited):
        assert "sacct" not in proc.stderr  # no accounting on this cluster, and no warnings about it

    status = hsbench("status", spec, *common, "--results", on_slurm).stdout
    assert "ok        1" in status and "failed    1" in status and "missing   0" in status
    assert "RuntimeError: fail_at_step=10 reached" in status
    assert list((on_slurm / "onslurm" / "logs").glob("*_0/*_log.out"))

    hsbench("run", spec, *common, "--results", local, check_rc=1)
    from_slurm = outcomes(on_slurm, "onslurm")
    assert len(from_slurm) == 4
    assert from_slurm == outcomes(local, "onslurm")
