"""What a new user and an operator hit first (issue 13): missing data, devices, environment
errors, corrupt records, orphan workers, concurrent runs. Each error is one line on stderr with
the documented exit code (2 bad input, 1 refused or failed, 130 interrupted) and leaves nothing.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from conftest import HSBENCH, REPO, hsbench, outcomes

from hsbench import results
from hsbench.cli import main
from hsbench.engine.runner import RunOptions, execute
from hsbench.engine.spec import Run
from hsbench.experiments.quadratic import Quadratic

QUADRATIC = 'kind = "quadratic"\n[settings]\ndim = 5\nsteps = 20\n[grid]\nlr = [0.01, 0.005, 0.001]\n'


def one_line(err: str) -> str:
    """The single line of ``err``; fails if there are more (e.g. a traceback)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def files_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


# 1. Missing data is found before a sweep starts


def test_missing_data_stops_the_sweep_before_anything_runs(write_spec, tmp_path, capsys):
    spec = write_spec(
        'kind = "optimizer-benchmark"\n[settings]\nproblem = "mnist_mlp"\noptimizer = "sgd"\n'
        "[grid]\nlr = [0.1, 0.01]\n",
        name="needs-mnist",
    )
    empty = tmp_path / "data"
    assert main(["run", str(spec), "--results", str(tmp_path / "res"), "--data-dir", str(empty)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "mnist not found in" in line and str(empty) in line
    assert f"hsbench download mnist --data-dir {empty}" in line
    assert not (tmp_path / "res").exists()
    slurm = ["--executor", "slurm", "--partition", "any"]  # checked before sbatch is looked for
    assert main(["run", str(spec), "--results", str(tmp_path / "res"), "--data-dir", str(empty), *slurm]) == 2
    assert "mnist not found in" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "res").exists()


# 2. --device is honest


def test_a_device_the_kind_does_not_compute_on_is_rejected_up_front(write_spec, tmp_path, capsys):
    spec = write_spec(QUADRATIC, name="cpuonly")
    assert main(["run", str(spec), "--results", str(tmp_path / "res"), "--device", "cuda"]) == 2
    assert one_line(capsys.readouterr().err) == "hsbench: error: --device cuda: kind quadratic runs on the CPU only"
    assert not (tmp_path / "res").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_where_there_is_none_is_rejected(write_spec, tmp_path, capsys):
    spec = write_spec('kind = "update-time"\n', name="gpu")
    assert main(["run", str(spec), "--results", str(tmp_path / "res"), "--device", "cuda:0"]) == 2
    assert one_line(capsys.readouterr().err) == "hsbench: error: --device cuda:0: cuda requested but not available"
    assert not (tmp_path / "res").exists()


def test_the_record_states_the_device_the_computation_used(write_spec, tmp_path, monkeypatch):
    """On a machine with CUDA, a CPU-only kind's run is recorded as run on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    spec = write_spec(QUADRATIC, name="where")
    assert main(["run", str(spec), "--results", str(tmp_path / "res")]) == 0
    assert set(results.load("where", tmp_path / "res")["device"]) == {"cpu"}


# 3. Environment errors: one line, exit code as documented, nothing left behind


def test_a_spec_that_is_not_utf8_is_one_line(tmp_path, capsys):
    spec = tmp_path / "latin1.toml"
    spec.write_bytes('kind = "quadratic"\ndescription = "Größe"\n'.encode("latin-1"))
    assert main(["run", str(spec), "--results", str(tmp_path / "res")]) == 2
    assert "latin1.toml: not UTF-8 text" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "res").exists()


def test_results_that_is_a_file_is_one_line(write_spec, tmp_path, capsys):
    spec = write_spec(QUADRATIC)
    afile = tmp_path / "results.txt"
    afile.write_text("not a folder")
    assert main(["run", str(spec), "--results", str(afile)]) == 2
    assert one_line(capsys.readouterr().err) == f"hsbench: error: --results {afile}: not a folder"


def read_only(folder: Path, *args) -> subprocess.CompletedProcess:
    """``hsbench *args`` with ``folder`` read-only: a read-only bind mount when root (root writes
    through permissions), else permissions."""
    command = [str(HSBENCH), *map(str, args)]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None:
            pytest.skip("root without unshare: cannot make a folder read-only")
        mount = f"mount --bind '{folder}' '{folder}' && mount -o remount,ro,bind '{folder}' && exec \"$@\""
        command = ["unshare", "-m", "sh", "-c", mount, "sh", *command]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    folder.chmod(0o555)
    try:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)


def test_read_only_results_run_is_refused_plot_works_export_is_refused(write_spec, tmp_path):
    spec = write_spec(QUADRATIC, name="ro")
    res = tmp_path / "res"
    assert main(["run", str(spec), "--results", str(res)]) == 0
    next((res / "ro" / "runs").glob("*.json")).unlink()  # one run left to do
    before = files_under(res)

    refused = read_only(res, "run", spec, "--results", res)
    assert refused.returncode == 2, refused.stderr
    assert one_line(refused.stderr).startswith(f"hsbench: error: --results {res}: cannot write there")

    plots = tmp_path / "plots"
    plotted = read_only(res, "plot", spec, "--results", res, "--plots", plots)
    assert plotted.returncode == 0, plotted.stderr
    assert (plots / "ro.png").exists()
    assert "Traceback" not in plotted.stderr

    exported = read_only(res, "export", spec, "--results", res, "--format", "csv")
    assert exported.returncode == 2, exported.stderr
    assert "cannot write there" in one_line(exported.stderr)
    assert files_under(res) == before


def test_download_without_internet_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    """The real download path, with torchvision's mirrors pointing at a closed local port."""
    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    existing = tmp_path / "data"
    existing.mkdir()
    (existing / "keep.txt").write_text("was there before")
    assert main(["download", "mnist", "--data-dir", str(existing)]) == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"hsbench: error: download of mnist into {existing} failed:")
    assert files_under(existing) == [existing / "keep.txt"]
    fresh = tmp_path / "new" / "data"
    assert main(["download", "mnist", "--data-dir", str(fresh)]) == 1
    assert not (tmp_path / "new").exists()


def limited_memory() -> None:
    resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, 4 << 30))  # a sweep expanded by mistake fails, not the machine


def test_a_sweep_beyond_the_cap_is_refused_unless_allowed(write_spec, tmp_path, capsys):
    huge = write_spec('kind = "quadratic"\n[seeds]\ncount = 1000000000\n', name="huge")
    command = [str(HSBENCH), "status", str(huge), "--results", str(tmp_path / "res")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, preexec_fn=limited_memory)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = one_line(proc.stderr)
    assert "1,000,000,000 runs, more than the limit of 100,000" in line and "--max-runs" in line
    spec = write_spec(QUADRATIC, name="three")
    assert main(["run", str(spec), "--results", str(tmp_path / "res"), "--max-runs", "2"]) == 2
    assert "3 runs, more than the limit of 2" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "res").exists()
    assert main(["run", str(spec), "--results", str(tmp_path / "res"), "--max-runs", "3"]) == 0


def interruptible() -> None:
    """Popen's preexec_fn: SIGINT handled by default in the child, as in a terminal's foreground job.
    A shell starts background jobs (``cmd &``, e.g. a CI script run in the background) with SIGINT
    ignored, and Python keeps an inherited ignore, so without this the Ctrl-C tests cannot interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


SLOW = 'kind = "quadratic"\n[settings]\ndim = 20\nsteps = 20000\nnoise = 0.1\n[seeds]\ncount = 4\n'


def test_ctrl_c_says_what_finished_and_a_rerun_resumes(write_spec, tmp_path):
    spec = write_spec(SLOW.replace("steps = 20000", "steps = 6000"), name="interrupted")
    res = tmp_path / "res"
    proc = subprocess.Popen(
        [str(HSBENCH), "run", str(spec), "--results", str(res)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
    )
    runs = res / "interrupted" / "runs"
    deadline = time.monotonic() + 120
    while not list(runs.glob("*.json")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    finished = len(list(runs.glob("*.json")))
    assert 1 <= finished < 4, "the sweep finished before Ctrl-C; make its runs longer"
    line = [line for line in err.splitlines() if line.startswith("hsbench")]
    assert line == [f"hsbench: interrupted: {finished} ok finished; rerun the same command to resume"], err
    assert "Traceback" not in err
    rerun = hsbench("run", spec, "--results", res)
    assert f"{finished} already done; running {4 - finished}" in rerun.stdout


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_ctrl_c_with_a_pool_stops_its_workers_and_a_rerun_completes(write_spec, tmp_path):
    spec = write_spec(SLOW.replace("steps = 20000", "steps = 6000"), name="interrupted")
    res = tmp_path / "res"
    proc = subprocess.Popen(
        [str(HSBENCH), "run", str(spec), "--jobs", "2", "--results", str(res)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=interruptible,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    runs = res / "interrupted" / "runs"
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not list(runs.glob("*.json")) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        workers = [pid for pid in children(proc.pid) if "python" in Path(f"/proc/{pid}/cmdline").read_text()]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole group
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)], "pool workers survived Ctrl-C"
    finally:  # whatever the outcome, leave no process of this test behind
        for pid in {proc.pid, *workers}:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert len(workers) >= 2
    finished = outcomes(res, "interrupted")  # whole records only, each readable
    assert 1 <= len(finished) < 4, "the runs in flight and queued ran on after Ctrl-C"
    assert {status for status, _, _ in finished.values()} == {"ok"}
    line = [line for line in err.splitlines() if line.startswith("hsbench")]
    assert line == [f"hsbench: interrupted: {len(finished)} ok finished; rerun the same command to resume"], err
    assert "Traceback" not in err
    rerun = hsbench("run", spec, "--jobs", "2", "--results", res)
    assert f"{len(finished)} already done; running {4 - len(finished)}" in rerun.stdout
    assert len(outcomes(res, "interrupted")) == 4


# 4. One corrupt record does not block the experiment


def test_a_truncated_record_is_reported_and_runs_again(write_spec, tmp_path, capsys):
    spec = write_spec(QUADRATIC, name="corrupt")
    res = tmp_path / "res"
    assert main(["run", str(spec), "--results", str(res)]) == 0
    path = sorted((res / "corrupt" / "runs").glob("*.json"))[0]
    path.write_text(path.read_text()[:50])
    capsys.readouterr()
    assert main(["status", str(spec), "--results", str(res)]) == 0
    captured = capsys.readouterr()
    assert "missing   1" in captured.out and "ok        2" in captured.out
    assert f"hsbench: warning: {path}: unreadable record" in captured.err
    assert main(["plot", str(spec), "--results", str(res), "--plots", str(tmp_path / "plots")]) == 0
    assert main(["run", str(spec), "--results", str(res)]) == 0
    assert "2 already done; running 1" in capsys.readouterr().out
    assert json.loads(path.read_text())["status"] == "ok"  # replaced by the rerun


# 5. status exits non-zero when runs failed


def test_status_exits_1_when_runs_failed(write_spec, tmp_path, capsys):
    spec = write_spec(QUADRATIC.replace("steps = 20", "steps = 20\nfail_at_step = 5"), name="failing")
    assert main(["run", str(spec), "--results", str(tmp_path / "res")]) == 1
    assert main(["status", str(spec), "--results", str(tmp_path / "res")]) == 1
    assert "failed    3" in capsys.readouterr().out


# 6. No orphans, no run executed twice


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_main_process_leaves_no_pool_worker(write_spec, tmp_path, sig):
    spec = write_spec(SLOW, name="orphans")
    proc = subprocess.Popen(
        [
            str(HSBENCH),
            "run",
            str(spec),
            "--jobs",
            "2",
            "--checkpoint-every",
            "0.05",
            "--results",
            str(tmp_path / "res"),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    workers: list[int] = []
    try:
        checkpoints = tmp_path / "res" / "orphans" / "checkpoints"
        deadline = time.monotonic() + 120
        while len(list(checkpoints.glob("*.pt"))) < 2:  # both workers are executing a run
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        workers = [pid for pid in children(proc.pid) if "python" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert len(workers) >= 2
        os.kill(proc.pid, sig)  # the main process alone
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)], "pool workers survived the main process"
    finally:  # whatever the outcome, leave no process of this test behind
        for pid in {proc.pid, *workers, *children(proc.pid)}:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


class Blocking(Quadratic):
    """The quadratic kind, counting its executions and holding each one until released."""

    started = threading.Event()
    release = threading.Event()
    executions = 0

    def run(self, settings, ctx):
        type(self).executions += 1
        type(self).started.set()
        assert type(self).release.wait(30)
        return {"loss": [1.0]}


def test_a_run_claimed_by_another_process_is_not_executed_twice(tmp_path):
    run = Run("0123456789abcdef", "claimed", f"{__name__}:Blocking", {"seed": 0, "scale": "default"})
    options = RunOptions(tmp_path)
    first = threading.Thread(target=execute, args=(run, options))
    first.start()
    assert Blocking.started.wait(30)
    assert execute(run, options) == "running"  # the claim is held: not executed again
    Blocking.release.set()
    first.join()
    assert Blocking.executions == 1
    assert execute(run, options) == "ok" and Blocking.executions == 1  # recorded: skipped
    assert not (tmp_path / "claimed" / "claims").exists()  # the claim is gone with its holder


# 7. Docs match behaviour


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["run", "quadratic", "--jobs", "abc"], "hsbench run: error: argument --jobs: invalid int value: 'abc'"),
        (["runn", "quadratic"], "hsbench: error: argument COMMAND: invalid choice: 'runn'"),
        (["status", "quadratic", "--wait"], "hsbench: error: unrecognized arguments: --wait"),
        ([], "hsbench: error: the following arguments are required: COMMAND"),
    ],
)
def test_argument_errors_are_one_line_with_exit_code_2(argv, expected, capsys):
    """argparse's own errors too (a mistyped flag or command), not its usage block first."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert one_line(capsys.readouterr().err).startswith(expected)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.startswith("hsbench ")


# 7. Figures drawn from the committed results say what they show


def drawn_figures(monkeypatch, module) -> list:
    """Capture the figures ``module``'s plot function saves."""
    figures = []
    monkeypatch.setattr(module, "save_figure", lambda fig, outdir, name: figures.append(fig) or [])
    monkeypatch.setattr(module, "save_markdown", lambda *args: Path("unused"), raising=False)
    return figures


def test_figure2a_says_what_its_colours_are(monkeypatch, tmp_path):
    from hsbench.experiments import approx_quality

    figures = drawn_figures(monkeypatch, approx_quality)
    df = results.load("figure2", REPO / "results")
    approx_quality.ApproxQuality().plot(df, SimpleNamespace(name="figure2"), tmp_path)
    labels = [ax.get_ylabel() for ax in figures[0].axes]
    assert any(label.startswith("initialization (seed)") for label in labels), labels


def test_figure8b_reference_labels_sit_right_of_the_curves():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from hsbench.experiments.update_time import panel_figure

    df = results.load("figure8", REPO / "results")
    ok = df[(df["status"] == "ok") & (df["panel"] == "b")]
    fig = panel_figure("b", ok)
    renderer = FigureCanvasAgg(fig).get_renderer()
    ratio_axes = fig.axes[1]
    labels = [t for t in ratio_axes.texts if t.get_text().startswith("paper")]
    assert labels
    for label in labels:
        assert label.get_window_extent(renderer).x0 >= ratio_axes.get_window_extent(renderer).x1


def test_table_of_one_run_shows_no_nan_standard_error():
    from hsbench.experiments.diag_dominance import rho_table

    table = rho_table(pd.DataFrame({"rho_before": [[0.9, 0.8]], "rho_after": [[0.3, 0.4]]}))
    assert not table.isna().any().any() and "se_before" not in table
    two = rho_table(pd.DataFrame({"rho_before": [[0.9, 0.8], [0.7, 0.8]], "rho_after": [[0.3, 0.4]] * 2}))
    assert two["se_before"].tolist() == [0.1, 0.0]


def test_make_bench_writes_the_table_the_readme_links(tmp_path):
    from hsbench import bench

    out = tmp_path / "bench.md"
    bench.main(["--tiny", "--rounds", "2", "--warmup", "0", "--out", str(out)])
    text = out.read_text()
    parts = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")}
    assert text.startswith("machine: ") and "backward" in parts
    assert bench.parse([]).out == Path("plots/bench.md") and "(plots/bench.md)" in (REPO / "README.md").read_text()


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs the git checkout")
def test_smoke_plots_and_run_claims_are_not_committed():
    for path in ("plots/smoke/figure2a.png", "results/figure2/claims/0123456789abcdef.lock"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


def documented_commands(path: Path) -> list[str]:
    """The hsbench command lines in the bash blocks of a markdown file, comments removed."""
    commands, in_bash = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_bash = line.strip() == "```bash"
        elif in_bash and "hsbench " in line.split("#")[0] and "make " not in line:
            commands.append(line.split("#")[0].strip())
    return commands


@pytest.mark.parametrize("doc", ["README.md", "docs/experiments.md"])
def test_documented_commands_run_as_written_from_the_repository_root(doc):
    """Each runs the venv's hsbench, without sudo, with options the parser accepts, on a spec that exists."""
    from hsbench.cli import _parser

    commands = documented_commands(REPO / doc)
    assert commands
    for command in commands:
        words = command.split()
        assert words[0] == ".venv/bin/hsbench" and "sudo" not in words, command
        args = _parser().parse_args(words[1:]) if words[1:] != ["--version"] else None
        if args is not None and hasattr(args, "spec"):
            assert (REPO / "experiments" / f"{args.spec}.toml").exists(), command
