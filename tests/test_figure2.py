"""The approx-quality kind (figure 2) end to end at smoke scale, through the CLI."""

import pytest

from hsbench import results
from hsbench.cli import main


@pytest.mark.parametrize("spec", ["figure2", "figure2-random", "figure2-cnn"])
def test_smoke_scale_runs_and_plots(spec, tmp_path):
    args = ["--scale", "smoke", "--results", str(tmp_path / "results")]
    assert main(["run", spec, *args]) == 0
    df = results.load(spec, tmp_path / "results", scale="smoke")
    assert (df["status"] == "ok").all() and len(df) >= 2
    normalized = lambda label: df[f"l1/{label}"] / df["l1/hesscale"]  # noqa: E731
    assert (normalized("hesscale") == 1.0).all()
    assert (normalized("bl89") > 1).all() and (normalized("hutchinson-1") > 1).all()
    last_layer = df["l1_layers/hesscale"].map(lambda layers: layers[-1])
    assert (last_layer < 1e-12 * df["l1/hesscale"]).all()  # exact diagonal at the last layer
    assert main(["plot", spec, *args, "--plots", str(tmp_path / "plots")]) == 0
    stem = spec + ("-" if "-" in spec else "")
    for suffix in ("a.png", "a.pdf", "b.png", "b.pdf"):
        assert (tmp_path / "plots" / "smoke" / f"{stem}{suffix}").stat().st_size > 1000



def test_torchvision_mnist_from_a_data_directory_and_a_clear_error_without(tmp_path):
    from fake_data import N_TRAIN, write_mnist

    from hsbench.data import mnist_like

    write_mnist(tmp_path)
    x, y, source = mnist_like("mnist", tmp_path)
    assert x.shape == (N_TRAIN, 1, 28, 28) and 0 <= float(x.min()) and float(x.max()) <= 1 and y.shape == (N_TRAIN,)
    assert str(tmp_path) in source
    with pytest.raises(FileNotFoundError, match=r"emnist not found in .*hsbench download emnist --data-dir"):
        mnist_like("emnist", tmp_path / "missing")
