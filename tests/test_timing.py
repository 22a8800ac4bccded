"""Figure 8 (kind ``update-time``) at smoke scale through the CLI, the interleaved timer, and the bench's table.
No timing assertions: only what was measured, on which networks, and that everything runs."""

import ctypes
import platform
from pathlib import Path

import pytest
import torch

from hsbench import bench, results
from hsbench.cli import main
from hsbench.curvature.diagonal_backprop import VARIANTS
from hsbench.experiments.update_time import panel_network
from hsbench.optim import OPTIMIZERS
from hsbench.timing import interleaved, steady_allocator


def test_figure8_smoke_records_true_parameter_counts_and_plots(tmp_path):
    args = ["--scale", "smoke", "--results", str(tmp_path / "results")]
    assert main(["run", "figure8", *args]) == 0
    df = results.load("figure8", tmp_path / "results", scale="smoke")
    assert (df["status"] == "ok").all() and sorted(df["panel"]) == ["a", "b"]
    for _, run in df.iterrows():
        assert run["sizes"] == ([16, 32] if run["panel"] == "a" else [1, 2])
        true_counts = [sum(p.numel() for p in panel_network(run["panel"], size).parameters()) for size in run["sizes"]]
        assert run["params"] == true_counts
        for name in OPTIMIZERS:
            assert [len(times) for times in run[f"times_s/{name}"]] == [run["updates"]] * len(run["sizes"])
            assert all(
                q25 <= median <= q75
                for q25, median, q75 in zip(
                    run[f"q25_s/{name}"], run[f"median_s/{name}"], run[f"q75_s/{name}"], strict=True
                )
            )
    assert main(["plot", "figure8", *args, "--plots", str(tmp_path / "plots")]) == 0
    for stem in ("figure8a.png", "figure8a.pdf", "figure8b.png", "figure8b.pdf", "figure8.md"):
        assert (tmp_path / "plots" / "smoke" / stem).stat().st_size > 500


def test_interleaved_prepares_every_call_and_keeps_rounds_after_warmup():
    calls = []
    tasks = {
        name: (lambda n=name: calls.append(("prepare", n)), lambda n=name: calls.append(("timed", n))) for name in "abc"
    }
    times = interleaved(
        tasks, rounds=4, warmup=2, generator=torch.Generator().manual_seed(0), device=torch.device("cpu")
    )
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert calls[0::2] == [("prepare", n) for _, n in calls[1::2]]  # each timed call right after its own prepare
    rounds = [sorted(n for _, n in calls[6 * r + 1 : 6 * r + 6 : 2]) for r in range(6)]
    assert rounds == [list("abc")] * 6  # one of each per round


def test_interleaved_rejects_bad_clocks():
    tasks = {"a": (lambda: None, lambda: None)}
    with pytest.raises(ValueError, match="unknown clock 'sundial'"):
        interleaved(tasks, 2, 0, torch.Generator(), torch.device("cpu"), "sundial")
    with pytest.raises(ValueError, match="CPU devices only"):
        interleaved(tasks, 2, 0, torch.Generator(), torch.device("cuda"), "cpu")


def test_bench_prints_one_table_with_every_method(capsys, tmp_path):
    bench.main(["--tiny", "--rounds", "2", "--warmup", "0", "--batch-3c3d", "2", "--out", str(tmp_path / "bench.md")])
    out = capsys.readouterr().out
    assert "torch threads: 1" in out and "versions: python" in out and "machine:" in out
    table = [
        line.split("|") for line in out.splitlines() if line.startswith("| backward") or line.startswith("| update")
    ]
    found = {(cells[1].strip(), cells[4].strip()) for cells in table}
    assert {m for part, m in found if part == "backward"} == {bench.GRADIENT, *VARIANTS}
    assert {m for part, m in found if part == "backward, autograd"} == {bench.GRADIENT, *bench.AUTOGRAD_METHODS}
    assert {m for part, m in found if part == "update"} == set(OPTIMIZERS)
    assert {cells[2].strip() for cells in table if cells[1].strip() == "update"} == {
        "fig. 8(a), 16 outputs, batch 1",
        "fig. 8(b), depth 1, batch 1",
        "cifar100_3c3d (ELU), batch 2",
    }


def test_bench_measures_the_ppo_update_of_every_rl_optimizer_against_adam(capsys, tmp_path):
    bench.main(["--tiny", "--rounds", "2", "--warmup", "0", "--batch-3c3d", "2", "--out", str(tmp_path / "bench.md")])
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith("| rl update")]
    assert [cells[4].strip() for cells in rows] == list(bench.RL_OPTIMIZERS)  # Adam, the baseline, first
    assert {cells[2].strip() for cells in rows} == {"PPO minibatch 64: actor + critic, 2x64 tanh"}
    assert float(rows[0][7]) == 1.0 and all(float(cells[7]) > 0 for cells in rows)


def test_original_implementation_harness_times_figure8s_networks_on_python_38(tmp_path):
    """``hsbench.original_update_time`` runs on the original's stack (Python 3.8, torch 1.10): its
    source and ``hsbench.timing`` parse as Python 3.8; on this stack it runs with Adam alone (the
    original package is imported only where it is timed), on the very networks of figure 8."""
    import ast

    from hsbench import original_update_time as original
    from hsbench import timing

    for module in (original, timing):
        ast.parse(Path(module.__file__).read_text(), feature_version=(3, 8))
    for panel, size in (("a", 16), ("a", 64), ("b", 1), ("b", 4)):
        theirs = original.network(panel, size).state_dict()
        torch.manual_seed(0)  # panel_network is seeded by its caller (update_time.twin_models)
        ours = panel_network(panel, size).state_dict()
        assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)

    out = tmp_path / "figure8.md"
    sizes = ["--max-outputs", "32", "--max-depth", "1"]
    original.main(["--optimizers", "adam", *sizes, "--updates", "2", "--warmup", "0", "--out", str(out)])
    text = out.read_text()
    assert "torch " + torch.__version__ in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("| 16", "41,488"), ("| 32", "49,696"), ("| 1", "84,580")]
    assert all(float(r[2].rstrip(" |")) > 0 for r in rows)
    bad = [["--optimizers", "adahessian"], ["--max-outputs", "24"], ["--max-depth", "0"], ["--updates", "1"]]
    for arguments in bad:
        with pytest.raises(SystemExit) as exit_info:
            original.main([*arguments, "--out", str(tmp_path / "bad.md")])
        assert exit_info.value.code == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["figure8.md"]  # nothing written for them


ORIGINAL_PYTHON = Path(__file__).resolve().parents[1] / ".venv-original" / "bin" / "python"


@pytest.mark.skipif(not ORIGINAL_PYTHON.exists(), reason="no .venv-original (make figure8-original makes it)")
def test_original_implementation_harness_runs_on_the_originals_stack(tmp_path):
    """Where ``make figure8-original`` made its environment (Python 3.8, torch 1.10, BackPACK 1.3,
    the authors' package), the harness times their optimizers there: what a syntax check misses."""
    import subprocess

    out = tmp_path / "figure8.md"
    args = ["--max-outputs", "16", "--panels", "a", "--updates", "2", "--warmup", "0", "--out", str(out)]
    root = ORIGINAL_PYTHON.parents[2]
    subprocess.run([str(ORIGINAL_PYTHON), "-m", "hsbench.original_update_time", *args], cwd=root, check=True)
    text = out.read_text()
    assert "python 3.8" in text and "torch 1.10" in text and "backpack-for-pytorch 1.3" in text
    (row,) = [line for line in text.splitlines() if line.startswith("| 16 |")]
    adam_ms, adahesscale, adahesscale_gn = (float(cell) for cell in row.strip("| ").split(" | ")[2:])
    assert adam_ms > 0 and adahesscale > 0 and adahesscale_gn > 0


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in [
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        ]
    ]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_bench_raises_glibcs_allocator_thresholds_and_says_so(capsys, tmp_path):
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype, libc.malloc.restype, libc.free.argtypes = _Mallinfo2, ctypes.c_void_p, [ctypes.c_void_p]
    assert steady_allocator()
    mapped = libc.mallinfo2().hblks
    block = libc.malloc(48 << 20)  # above glibc's largest default threshold (32 MB): mapped unless raised
    assert block and libc.mallinfo2().hblks == mapped
    libc.free(block)
    bench.main(["--tiny", "--rounds", "2", "--warmup", "0", "--batch-3c3d", "2", "--out", str(tmp_path / "bench.md")])
    assert "allocator: glibc's, mmap and trim thresholds raised" in capsys.readouterr().out
