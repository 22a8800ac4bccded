"""Kinds rl-performance, rl-robustness, rl-stability: the smoke scales of the RL specs through the
engine, divergence and device in the record, resume through the run context, and the plots'
arithmetic (binning, summaries, best step size, normalization, η) against hand-computed values."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import HSBENCH, REPO, hsbench, outcomes

from hsbench import cli
from hsbench.engine.runner import RunContext, RunOptions, execute
from hsbench.engine.spec import load_spec
from hsbench.experiments import KINDS, rl
from hsbench.experiments.rl import RLPerformance

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SPECS = {  # spec: the figure stems its plot writes
    "figure5": ("figure5.png", "figure5.pdf", "figure5-best.md"),
    "figure10": ("figure10.png", "figure10-best.md"),
    "figure6": ("figure6.png", "figure6-eta.png", "figure6-eta.pdf", "figure6.md"),
    "figure11": ("figure11.png", "figure11-eta.png", "figure11.md"),
    "figure12": ("figure12.png", "figure12-eta.png", "figure12.md"),
    "figure13": ("figure13.png", "figure13-eta.png", "figure13.md"),
    "figure7": ("figure7.png", "figure7.pdf", "figure7-runs.md"),
}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Every RL spec at scale smoke, run in this process and plotted; {spec: records}."""
    root = tmp_path_factory.mktemp("rl-smoke")
    results, plots = root / "results", root / "plots"
    records = {}
    for name in SPECS:
        spec = str(EXPERIMENTS / f"{name}.toml")
        assert cli.main(["run", spec, "--scale", "smoke", "--results", str(results)]) == 0
        assert cli.main(["plot", spec, "--scale", "smoke", "--results", str(results), "--plots", str(plots)]) == 0
        records[name] = [json.loads(p.read_text()) for p in sorted((results / name / "runs").glob("*.json"))]
    return plots / "smoke", records


def test_smoke_runs_are_ok_with_returns_on_the_cpu(smoke):
    _, records = smoke
    assert {name: len(found) for name, found in records.items()} == {
        "figure5": 4,
        "figure10": 2,
        "figure6": 4,
        "figure11": 2,
        "figure12": 2,
        "figure13": 2,
        "figure7": 2,
    }
    for found in records.values():
        for rec in found:
            metrics = rec["metrics"]
            assert rec["status"] == "ok", rec["error"]
            assert rec["device"] == "cpu"
            assert (
                metrics["diverged_at_step"] is None and len(metrics["episode_returns"]) >= 2
            )  # Swimmer: 1000-step episodes
            assert metrics["episode_steps"][-1] <= rec["settings"]["total_steps"] == 2048
            assert metrics["time_env_s"] > 0 and metrics["time_update_s"] > 0
            assert (len(metrics["eta_actor"]) > 0) == rec["settings"]["optimizer"].startswith("scaled-")


def test_smoke_plots(smoke):
    plots, _ = smoke
    for stems in SPECS.values():
        for stem in stems:
            assert (plots / stem).stat().st_size > 0
    best = (plots / "figure5-best.md").read_text()
    assert best.count("| Hopper-v5 |") == 4  # a2c and ppo x adahesscale and adam


def test_scaled_step_at_a_huge_step_size_is_scaled_down(smoke):
    _, records = smoke
    for rec in records["figure6"]:
        eta = rec["metrics"]["eta_actor"] + rec["metrics"]["eta_critic"]
        if rec["settings"]["lr"] == 1e3:  # lr 1e3 does not diverge: η makes the step lr-independent
            assert max(eta) < 1e-5
        else:
            assert max(eta) <= 1.0


DIVERGING = """
kind = "rl-performance"
[settings]
algorithm = "a2c"
env = "Hopper-v5"
optimizer = "adam"
lr = 1e30
total_steps = 2048
"""


def test_diverging_run_is_recorded_with_its_step_and_plotted(write_spec, tmp_path):
    spec = write_spec(DIVERGING, name="diverging")
    (run,) = load_spec(spec, KINDS).runs()
    assert execute(run, RunOptions(tmp_path)) == "diverged"
    rec = json.loads((tmp_path / "diverging" / "runs" / f"{run.id}.json").read_text())
    metrics = rec["metrics"]
    assert rec["status"] == "diverged" and rec["error"] is None
    assert 0 < metrics["diverged_at_step"] <= 2048 and metrics["diverged"]
    assert all(step <= metrics["diverged_at_step"] for step in metrics["episode_steps"])
    assert rec["device"] == "cpu"
    plots = tmp_path / "plots"
    assert cli.main(["plot", str(spec), "--results", str(tmp_path), "--plots", str(plots)]) == 0
    assert "| a2c | Hopper-v5 | adam | 1e+30 | -inf | 1 | 1 |" in (plots / "diverging-best.md").read_text()


def test_cuda_is_rejected_before_anything_runs(write_spec, tmp_path, capsys):
    spec = write_spec(DIVERGING, name="diverging")
    assert cli.main(["run", str(spec), "--device", "cuda", "--results", str(tmp_path)]) == 2
    assert "--device cuda: kind rl-performance runs on the CPU only" in capsys.readouterr().err
    assert not (tmp_path / "diverging").exists()


class Stop(Exception):
    pass


class StoppingContext(RunContext):
    """A run context that checkpoints at every chance and stops the run after its first checkpoint."""

    def save_checkpoint(self, state) -> None:
        super().save_checkpoint(state)
        raise Stop


def test_killed_run_resumes_to_the_same_metrics(tmp_path):
    settings = {
        "algorithm": "a2c",
        "env": "InvertedPendulum-v5",
        "optimizer": "scaled-adam",
        "lr": 1e-3,
        "total_steps": 6144,
        "trust_region": 1e-8,
        "trust_region_bias_correction": True,
        "summary": "mean",
        "seed": 0,
    }
    kind = RLPerformance()
    straight = kind.run(settings, RunContext("straight", 0, "cpu", tmp_path / "straight.pt"))
    with pytest.raises(Stop):
        kind.run(settings, StoppingContext("killed", 0, "cpu", tmp_path / "killed.pt", checkpoint_interval_s=0))
    resumed_ctx = RunContext("killed", 0, "cpu", tmp_path / "killed.pt")
    resumed = kind.run(settings, resumed_ctx)
    assert resumed_ctx.resumed
    timing = ("time_env_s", "time_policy_s", "time_update_s")
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in straight.items() if k not in timing
    }
    assert len(straight["eta_steps"]) == 3 and len(straight["episode_returns"]) > 20


# -- the plots' arithmetic on hand-made data ----------------------------------------------------------


def test_binned_returns_by_hand():
    steps, returns = [10, 25, 30, 95], [1.0, 3.0, 2.0, 8.0]  # bins (0, 25], (25, 50], (50, 75], (75, 100]
    np.testing.assert_array_equal(rl.binned_returns(steps, returns, 100, bins=4), [2.0, 2.0, 2.0, 8.0])
    np.testing.assert_array_equal(rl.binned_returns([30, 35], [2.0, 4.0], 100, bins=4), [np.nan, 3.0, 3.0, 3.0])
    diverged = rl.binned_returns(steps, returns, 100, end=60, bins=4)  # intervals starting at or after 60: NaN
    np.testing.assert_array_equal(diverged, [2.0, 2.0, 2.0, np.nan])


def test_summaries_by_hand():
    curve = np.array([np.nan, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0])
    assert rl.summarize(curve, "mean") == 6.0
    assert rl.summarize(curve, "final") == 10.5  # the last ceil(10 % of 12) = 2 bins
    assert math.isnan(rl.summarize(np.full(3, np.nan), "mean"))
    curve = np.array([np.nan, 1.0, 3.0, 5.0, 7.0, *[2.0] * 14, 0.0])  # 20 bins: windows of 2
    assert rl.peak(curve) == 6.0 and rl.summarize(curve, "final") == 1.0


def runs_table(rows) -> pd.DataFrame:
    """Runs as ``with_curves`` leaves them: (algorithm, env, optimizer, lr, seed, status, value)."""
    return pd.DataFrame(rows, columns=["algorithm", "env", "optimizer", "lr", "seed", "status", "value"])


def test_best_step_size_by_hand():
    runs = runs_table(
        [
            ("ppo", "Hopper-v5", "adam", 1e-4, 0, "ok", 12.0),
            ("ppo", "Hopper-v5", "adam", 1e-4, 1, "ok", 14.0),  # 13
            ("ppo", "Hopper-v5", "adam", 1e-3, 0, "ok", 10.0),
            ("ppo", "Hopper-v5", "adam", 1e-3, 1, "ok", 20.0),  # 15
            ("ppo", "Hopper-v5", "adam", 1e-2, 0, "ok", 90.0),
            ("ppo", "Hopper-v5", "adam", 1e-2, 1, "diverged", math.nan),
            ("ppo", "Hopper-v5", "adahesscale", 1e-2, 0, "ok", 6.0),
            ("ppo", "Hopper-v5", "adahesscale", 1e-3, 0, "ok", 6.0),
            ("a2c", "Hopper-v5", "adam", 1.0, 0, "diverged", math.nan),
            ("a2c", "Hopper-v5", "adam", 1e-1, 0, "diverged", math.nan),
        ]
    )
    best = rl.best_step_sizes(runs)
    found = {(r.algorithm, r.optimizer): (r.lr, r.score, r.seeds, r.diverged) for r in best.itertuples()}
    assert found == {
        ("a2c", "adam"): (1e-1, -math.inf, 1, 1),  # all diverged: the smallest step size
        ("ppo", "adahesscale"): (1e-3, 6.0, 1, 0),  # a tie: the smaller step size
        ("ppo", "adam"): (1e-3, 15.0, 2, 0),  # 1e-2 has the best seed but a diverged one
    }


def test_normalization_by_hand():
    runs = runs_table(
        [
            ("ppo", "Hopper-v5", "scaled-adam", 1e-4, 0, "ok", 10.0),
            ("ppo", "Hopper-v5", "scaled-adam", 1e-4, 1, "ok", 20.0),
            ("ppo", "Hopper-v5", "scaled-adam", 1.0, 0, "diverged", math.nan),
            ("ppo", "Hopper-v5", "scaled-adam", 1.0, 1, "ok", 4.0),
            ("ppo", "Hopper-v5", "scaled-adahesscale", 1e-4, 0, "ok", 30.0),
            ("ppo", "Hopper-v5", "scaled-adahesscale", 1e-4, 1, "ok", 30.0),
            ("ppo", "Hopper-v5", "scaled-adahesscale", 1.0, 0, "ok", 20.0),
            ("ppo", "Hopper-v5", "scaled-adahesscale", 1.0, 1, "ok", 22.0),
            ("ppo", "Reacher-v5", "scaled-adam", 1e-4, 0, "ok", -5.0),
            ("ppo", "Reacher-v5", "scaled-adam", 1.0, 0, "ok", -5.0),
        ]
    )
    scores = rl.normalized_scores(runs).set_index(["env", "optimizer", "lr"])
    hopper = scores.loc["Hopper-v5"]  # the diverged run counts as the panel's lowest value, 4: lo 4, hi 30
    expected = {  # (mean, se, normalized, normalized se, diverged)
        ("scaled-adam", 1e-4): (15.0, 5.0, 11 / 26, 5 / 26, 0),
        ("scaled-adam", 1.0): (4.0, 0.0, 0.0, 0.0, 1),
        ("scaled-adahesscale", 1e-4): (30.0, 0.0, 1.0, 0.0, 0),
        ("scaled-adahesscale", 1.0): (21.0, 1.0, 17 / 26, 1 / 26, 0),
    }
    for key, (mean, se, normalized, normalized_se, diverged) in expected.items():
        row = hopper.loc[key]
        assert row["mean"] == pytest.approx(mean) and row["se"] == pytest.approx(se)
        assert row["normalized"] == pytest.approx(normalized) and row["normalized_se"] == pytest.approx(normalized_se)
        assert row["diverged"] == diverged and row["seeds"] == 2
    reacher = scores.loc["Reacher-v5"]  # its own panel; all means equal: 0
    assert list(reacher["normalized"]) == [0.0, 0.0] and list(reacher["se"]) == [0.0, 0.0]


def test_eta_table_by_hand():
    runs = pd.DataFrame(
        {
            "algorithm": ["ppo"] * 3,
            "env": ["Hopper-v5"] * 3,
            "optimizer": ["scaled-adam", "scaled-adam", "adam"],
            "lr": [1e-3] * 3,
            "eta_actor": [[1.0, 0.5], [0.5, 0.5], []],
            "eta_critic": [[0.2, 0.2], [0.1, 0.3], []],
        }
    )
    eta = rl.eta_table(runs)
    assert len(eta) == 1 and eta["optimizer"][0] == "scaled-adam"
    assert eta["eta_actor"][0] == pytest.approx(0.625) and eta["eta_critic"][0] == pytest.approx(0.2)


def test_with_curves_summarizes_by_the_runs_setting():
    runs = pd.DataFrame(
        {
            "algorithm": ["ppo", "ppo"],
            "env": ["Hopper-v5", "Humanoid-v5"],
            "total_steps": [100, 0],
            "status": ["ok", "diverged"],
            "summary": ["final", "final"],
            "diverged_at_step": [None, 5_000_000],
            "episode_steps": [[10, 88], [100_000]],
            "episode_returns": [[1.0, 8.0], [7.0]],
        }
    )
    found = rl.with_curves(runs)
    assert list(found["total"]) == [100, 10_000_000]  # 0: the paper's budget, 10M for Humanoid
    assert found["value"][0] == 8.0 and math.isnan(found["value"][1])  # a diverged run has no value
    assert np.isnan(found["curve"][1][50:]).all() and (found["curve"][1][:50] == 7.0).all()


def test_progress_line_says_step_and_speed(monkeypatch, capsys):
    monkeypatch.setattr(rl, "PROGRESS_EVERY_S", 0.0)
    progress = rl.Progress("ppo Hopper-v5 adam lr=0.0003 seed=0", 8192)
    progress(2048)  # the first call only starts the clock (a resumed run starts later)
    assert capsys.readouterr().err == ""
    progress(4096)
    line = capsys.readouterr().err
    assert line.startswith("ppo Hopper-v5 adam lr=0.0003 seed=0: 4,096/8,192 steps (50 %), ") and "steps/s" in line


def test_every_run_its_own_line_one_colour_per_optimizer():
    curves = [np.full(rl.BINS, float(i)) for i in range(4)]
    runs = pd.DataFrame(
        {
            "algorithm": ["ppo"] * 4,
            "env": ["Reacher-v5"] * 4,
            "optimizer": ["adam", "adam", "scaled-adam", "scaled-adam"],
            "lr": [3e-4] * 4,
            "status": ["ok"] * 4,
            "total": [1000] * 4,
            "curve": curves,
        }
    )
    (ax,) = rl.curves_figure(runs, "caption", spread=False).axes
    lines = {float(line.get_ydata()[0]): line.get_color() for line in ax.get_lines()}
    assert len(lines) == 4 and lines[0.0] == lines[1.0] != lines[2.0] == lines[3.0]


def test_sigkilled_cli_run_resumes_to_the_same_metrics(write_spec, tmp_path):
    """`hsbench run` of an RL spec SIGKILLed (with its workers) after a checkpoint, then rerun, records
    what an uninterrupted run records: environment, normalizers, optimizer and RNG state all resume."""
    spec = write_spec(
        """
kind = "rl-performance"
[settings]
algorithm = "ppo"
env = "InvertedPendulum-v5"
optimizer = "scaled-adahesscale"
lr = 1e-3
total_steps = 16384
summary = "mean"
[seeds]
count = 1
""",
        name="killed",
    )
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    args = [str(HSBENCH), "run", str(spec), "--jobs", "2", "--checkpoint-every", "0", "--results", str(killed)]
    checkpoints = killed / "killed" / "checkpoints"
    for attempt in range(2):  # kill twice: a resumed run must itself resume
        proc = subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        seen = {p.stat().st_mtime for p in checkpoints.glob("[!.]*")} if checkpoints.exists() else set()
        while proc.poll() is None and not (
            checkpoints.exists() and {p.stat().st_mtime for p in checkpoints.glob("[!.]*")} - seen
        ):
            time.sleep(0.01)
        assert proc.poll() is None, f"attempt {attempt}: the run finished before a checkpoint; make it longer"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (killed / "killed" / "runs").exists() or not list((killed / "killed" / "runs").glob("*.json"))

    hsbench("run", spec, "--results", killed)
    hsbench("run", spec, "--results", reference)
    timing = ("time_env_s", "time_policy_s", "time_update_s")
    [(status, _, resumed)] = outcomes(killed, "killed").values()
    [(_, _, straight)] = outcomes(reference, "killed").values()
    assert status == "ok"
    [record] = [json.loads(p.read_text()) for p in (killed / "killed" / "runs").glob("*.json")]
    assert record["resumed"]
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in straight.items() if k not in timing
    }
    assert not list(checkpoints.glob("[!.]*"))
