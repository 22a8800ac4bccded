"""The diag-dominance kind (table 1, figure 3): ρ, the pre-activation Hessians, smoke runs."""

import math

import pandas as pd
import pytest
import torch
from torch import nn

from hsbench.cli import main
from hsbench.experiments.diag_dominance import pre_activation_hessians, rho


def test_rho_of_diagonal_hollow_and_gaussian_matrices():
    assert float(rho(torch.diag(torch.randn(7)))) == pytest.approx(1.0)
    assert float(rho(torch.ones(5, 5) - torch.eye(5))) == 0.0
    gaussian = rho(torch.randn(200, 128, 128, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert float(gaussian.mean()) == pytest.approx(1 / math.sqrt(128), abs=0.002)  # ≈ 0.09


def test_pre_activation_hessians_match_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ELU(), nn.Linear(4, 3)).double()
    x, y = torch.randn(2, 6, dtype=torch.float64), torch.tensor([0, 2])
    loss_fn = nn.CrossEntropyLoss()
    found = pre_activation_hessians(model, loss_fn, x, y)
    assert len(found) == 2
    for layer, start in enumerate((2, 4)):  # Hessian w.r.t. the output of model[start - 1]
        for n in range(2):
            a = model[:start](x[n : n + 1]).detach()[0]
            expected = torch.func.hessian(lambda u: loss_fn(model[start:](u.unsqueeze(0)), y[n : n + 1]))(a)
            torch.testing.assert_close(found[layer][n], expected)


@pytest.mark.parametrize(
    "spec,files", [("table1", ["table1.md", "table1.csv"]), ("figure3", ["figure3.png", "figure3.pdf", "figure3.md"])]
)
def test_smoke_scale_runs_and_plots(spec, files, tmp_path, capsys):
    args = ["--scale", "smoke", "--results", str(tmp_path / "results")]
    assert main(["run", spec, *args]) == 0
    assert main(["plot", spec, *args, "--plots", str(tmp_path / "plots")]) == 0
    for name in files:
        assert (tmp_path / "plots" / "smoke" / name).stat().st_size > 100
    table = pd.read_csv(tmp_path / "plots" / "smoke" / f"{spec}.csv")
    assert table["layer"].tolist() == [1, 2, 3, 4]
    assert ((table[["rho_before", "rho_after"]] > 0.09) & (table[["rho_before", "rho_after"]] <= 1)).all().all()
    assert (tmp_path / "plots" / "smoke" / f"{spec}.md").read_text() in capsys.readouterr().out
