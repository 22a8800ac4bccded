"""Figure 2 recomputed against its committed paper-scale results: one initialization (seed 0,
1000 examples, every method) must give the stored numbers to float rounding.

The stored runs (``results/figure2/runs``, scale ``paper``) were made before the faster
computation (Hutchinson's H z by a walk of the recorded forward pass, probes unpacked by table,
errors summed per parameter tensor); they keep it honest: any change of a method, of the
Monte-Carlo draws or of the SGD run along which examples are met changes these means far beyond
the tolerance. Rounding alone moves them by less than 1e-12 relative (summation order)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from hsbench.experiments.approx_quality import ApproxQuality

RUNS = Path(__file__).resolve().parents[1] / "results" / "figure2" / "runs"


def stored_run(scale: str, seed: int) -> dict:
    records = [json.loads(path.read_text()) for path in RUNS.glob("*.json")]
    (record,) = [r for r in records if r["scale"] == scale and r["settings"]["seed"] == seed]
    assert record["status"] == "ok"
    return record


def test_one_paper_scale_initialization_reproduces_the_stored_numbers():
    record = stored_run("paper", seed=0)
    settings = {name: field.default for name, field in ApproxQuality.fields.items()}
    settings |= {k: v for k, v in record["settings"].items() if k not in ("seed", "scale")}
    assert settings["examples"] == 1000 and settings["mc_large"] == 50
    ctx = SimpleNamespace(seed=0, device="cpu", data_dir=None, load_checkpoint=lambda: None)
    ctx.checkpoint_due = lambda: False
    metrics = ApproxQuality().run(settings, ctx)

    stored = record["metrics"]
    numbers = [k for k in stored if k.startswith(("l1/", "l1_layers/", "norm_diag"))]
    assert len(numbers) == 2 + 2 * 11  # |diag(H)| and 11 methods, total and per layer
    for key in numbers:
        assert metrics[key] == pytest.approx(stored[key], rel=1e-10, abs=1e-12), key
