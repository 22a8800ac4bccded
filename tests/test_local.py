"""Local execution: records, statuses, resume, process pool, checkpoints, load, plot, export."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch

from hsbench import results
from hsbench.cli import main
from hsbench.engine.kind import Field
from hsbench.engine.provenance import git_revision
from hsbench.engine.runner import RunOptions, execute
from hsbench.engine.spec import load_spec
from hsbench.engine.store import Store
from hsbench.experiments import KINDS
from hsbench.experiments.quadratic import Quadratic

SPEC = """
kind = "quadratic"
description = "test sweep"
[settings]
dim = 5
steps = 40
[grid]
optimizer = ["sgd", "adam"]
lr = [0.01, 0.5]
fail_at_step = [-1, 10]
[seeds]
count = 1
"""
# sgd with lr 0.5 diverges before step 10 (eigenvalues up to 100), so of the 8 runs
# 2 diverge, 3 fail at step 10 (sgd lr 0.01, adam lr 0.01 and 0.5) and 3 are ok.


@pytest.fixture
def sweep(write_spec, tmp_path):
    spec = write_spec(SPEC, name="sweep")
    return spec, tmp_path / "results"


def by_settings(results_dir, statuses=("ok", "failed", "diverged")):
    df = results.load("sweep", results_dir)
    return df[df["status"].isin(statuses)].set_index(["optimizer", "lr", "fail_at_step"]).sort_index()


def test_local_run_records_ok_failed_and_diverged(sweep, capsys):
    spec, res = sweep
    assert main(["run", str(spec), "--results", str(res)]) == 1  # some runs failed
    assert "3 ok, 3 failed, 2 diverged" in capsys.readouterr().out
    df = by_settings(res)
    assert len(df) == 8
    assert df.loc[("sgd", 0.5, -1), "status"] == "diverged"
    assert df.loc[("sgd", 0.5, 10), "status"] == "diverged"
    assert df.loc[("adam", 0.5, -1), "status"] == "ok"
    failed = df.loc[("adam", 0.01, 10)]
    assert failed["status"] == "failed" and "RuntimeError: fail_at_step=10 reached" in failed["error"]
    ok = df.loc[("sgd", 0.01, -1)]
    assert len(ok["loss"]) == 40 and ok["final_loss"] < ok["loss"][0]
    record = json.loads((res / "sweep" / "runs" / f"{ok['run_id']}.json").read_text())
    assert record["versions"]["torch"] and record["git_revision"] and record["wall_time_s"] > 0
    assert record["settings"] == load_spec(spec, KINDS).runs()[0].settings
    assert not list((res / "sweep" / "checkpoints").glob("*"))


def test_rerun_skips_finished_runs_and_retries_failed(sweep, capsys):
    spec, res = sweep
    main(["run", str(spec), "--results", str(res)])
    runs_dir = res / "sweep" / "runs"
    mtimes = {p.name: p.stat().st_mtime_ns for p in runs_dir.glob("*.json")}
    capsys.readouterr()
    assert main(["run", str(spec), "--results", str(res)]) == 1
    assert "5 already done; running 3" in capsys.readouterr().out
    statuses = {p.name: json.loads(p.read_text())["status"] for p in runs_dir.glob("*.json")}
    changed = {name for name, t in mtimes.items() if (runs_dir / name).stat().st_mtime_ns != t}
    assert changed == {name for name, status in statuses.items() if status == "failed"}


def test_process_pool_gives_the_same_records_as_sequential(sweep, tmp_path):
    spec, res = sweep
    main(["run", str(spec), "--results", str(res)])
    main(["run", str(spec), "--results", str(tmp_path / "pool"), "--jobs", "2"])
    columns = ["status", "loss", "final_loss"]
    pd.testing.assert_frame_equal(by_settings(res)[columns], by_settings(tmp_path / "pool")[columns])


def test_status_plot_and_export_use_stored_results_only(sweep, tmp_path, capsys):
    spec, res = sweep
    plots = tmp_path / "plots"
    assert main(["plot", str(spec), "--results", str(res), "--plots", str(plots)]) == 1
    assert "no stored results" in capsys.readouterr().err
    main(["run", str(spec), "--results", str(res)])
    capsys.readouterr()
    assert main(["status", str(spec), "--results", str(res)]) == 1  # some runs failed
    out = capsys.readouterr().out
    for line in ("ok        3", "failed    3", "diverged  2", "missing   0"):
        assert line in out
    assert "RuntimeError: fail_at_step=10 reached" in out
    assert main(["plot", str(spec), "--results", str(res), "--plots", str(plots)]) == 0
    png = plots / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["export", str(spec), "--results", str(res), "--format", "csv"]) == 0
    table = pd.read_csv(res / "sweep" / "sweep-default.csv")
    assert len(table) == 8 and json.loads(table.loc[table["status"] == "ok", "loss"].iloc[0])[0] > 0
    parquet = pd.read_parquet(res / "sweep" / "sweep-default.parquet")  # written by plot
    assert sorted(parquet["run_id"]) == sorted(table["run_id"])


class WithMomentum(Quadratic):
    """The quadratic kind after a setting was added to it, with a default."""

    fields = Quadratic.fields | {"momentum": Field(float, "a setting added later", default=0.0)}


class NoisierByDefault(Quadratic):
    """The quadratic kind after the default of its setting ``noise`` (0.0) was changed."""

    fields = Quadratic.fields | {"noise": dataclasses.replace(Quadratic.fields["noise"], default=0.25)}


def status_counts(spec, res, capsys) -> dict[str, int]:
    capsys.readouterr()
    assert main(["status", str(spec), "--results", str(res)]) in (0, 1)  # 1 when some runs failed
    return {line.split()[0]: int(line.split()[1]) for line in capsys.readouterr().out.splitlines()[1:7]}


def test_adding_a_field_with_a_default_keeps_the_stored_runs(sweep, monkeypatch, capsys):
    spec, res = sweep
    main(["run", str(spec), "--results", str(res)])
    before = status_counts(spec, res, capsys)
    assert before["missing"] == 0
    monkeypatch.setitem(KINDS, "quadratic", WithMomentum())
    assert status_counts(spec, res, capsys) == before
    assert main(["run", str(spec), "--results", str(res)]) == 1
    assert "5 already done; running 3" in capsys.readouterr().out  # only the failed runs again
    assert len(results.load("sweep", res)) == 8


def test_changing_a_default_leaves_the_runs_that_used_it_missing(sweep, monkeypatch, capsys, tmp_path):
    spec, res = sweep
    main(["run", str(spec), "--results", str(res)])
    monkeypatch.setitem(KINDS, "quadratic", NoisierByDefault())
    assert status_counts(spec, res, capsys)["missing"] == 8
    assert main(["plot", str(spec), "--results", str(res), "--plots", str(tmp_path / "plots")]) == 1
    assert "no stored results" in capsys.readouterr().err


class Where(Quadratic):
    """The quadratic kind reporting the device and data directory its run was given."""

    def run(self, settings, ctx):
        return {"data_dir": str(ctx.data_dir), "ctx_device": ctx.device}


def test_device_and_data_dir_reach_pool_workers_and_nothing_leaks(write_spec, tmp_path, monkeypatch):
    spec = write_spec('kind = "quadratic"\n[seeds]\ncount = 2\n', name="where")
    monkeypatch.setitem(KINDS, "quadratic", Where())  # found by import path in the pool workers too
    data = tmp_path / "elsewhere"
    args = ["run", str(spec), "--jobs", "2", "--device", "cpu:0", "--data-dir", str(data)]
    assert main([*args, "--results", str(tmp_path / "given")]) == 0
    given = results.load("where", tmp_path / "given")
    assert given["ctx_device"].tolist() == ["cpu:0"] * 2 and given["data_dir"].tolist() == [str(data)] * 2
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(spec), "--results", str(tmp_path / "later")]) == 0  # same process, no options
    later = results.load("where", tmp_path / "later")
    assert later["ctx_device"].tolist() == ["cuda" if torch.cuda.is_available() else "cpu"] * 2
    assert later["data_dir"].tolist() == [str(tmp_path / "data")] * 2


def test_export_of_a_format_the_kind_does_not_declare_is_a_usage_error(sweep, capsys):
    spec, res = sweep
    main(["run", str(spec), "--results", str(res)])
    capsys.readouterr()
    assert main(["export", str(spec), "--results", str(res), "--format", "deepobs"]) == 2
    err = capsys.readouterr().err
    assert err == "hsbench: error: --format deepobs: kind quadratic exports only csv, parquet\n"
    assert not list((res / "sweep").glob("*deepobs*"))


def test_status_flags_records_of_another_git_revision(sweep, capsys):
    spec, res = sweep
    main(["run", str(spec), "--results", str(res)])
    path = next((res / "sweep" / "runs").glob("*.json"))
    record = json.loads(path.read_text())
    path.write_text(json.dumps(record | {"git_revision": "0" * 40}))
    capsys.readouterr()
    main(["status", str(spec), "--results", str(res)])
    assert f"1 record(s) from another git revision than {git_revision()}: {record['id']}" in capsys.readouterr().out


def test_list_shows_experiments_scales_and_invalid_specs(write_spec, capsys):
    spec = write_spec(SPEC + "[scales.smoke.settings]\nsteps = 3\n", name="sweep")
    write_spec('kind = "cubic"\n', name="broken")
    assert main(["list", "--experiments", str(spec.parent)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("broken") and "INVALID" in out[0] and "kind: unknown value 'cubic'" in out[0]
    assert out[1].split()[:5] == ["sweep", "quadratic", "scales:", "default,", "smoke"]


def test_series_unrolls_a_metric_into_long_form(sweep):
    spec, res = sweep
    main(["run", str(spec), "--results", str(res)])
    df = results.load("sweep", res)
    long = results.series(df[df["status"] == "ok"], "loss")
    assert len(long) == 3 * 40 and list(long["step"][:3]) == [0, 1, 2]
    first = df[df["status"] == "ok"].iloc[0]
    assert long[long["run_id"] == first["run_id"]]["loss"].tolist() == first["loss"]
    assert results.load("sweep", res, scale="smoke").empty


def test_run_resumes_from_its_checkpoint(write_spec, tmp_path):
    spec = load_spec(
        write_spec('kind = "quadratic"\n[settings]\nsteps = 300\nnoise = 0.5\noptimizer = "adam"\n'), KINDS
    )
    run = spec.runs()[0]
    whole = tmp_path / "whole"
    assert execute(run, RunOptions(whole)) == "ok"

    # interrupted after step 120: a checkpoint exists but no record
    parts = tmp_path / "parts"
    interrupted = type(run)(run.id, run.experiment, run.kind_path, run.settings | {"fail_at_step": 120})
    assert execute(interrupted, RunOptions(parts, checkpoint_interval_s=0)) == "failed"
    store = Store(parts, run.experiment)
    store.runs_dir.joinpath(f"{run.id}.json").unlink()
    assert store.checkpoint_path(run.id).exists()
    assert len(torch.load(store.checkpoint_path(run.id), weights_only=False)["losses"]) == 120
    assert execute(run, RunOptions(parts)) == "ok"
    assert store.read(run.id)["resumed"] and not Store(whole, run.experiment).read(run.id)["resumed"]
    assert store.read(run.id)["metrics"] == Store(whole, run.experiment).read(run.id)["metrics"]
    assert not store.checkpoint_path(run.id).exists()
