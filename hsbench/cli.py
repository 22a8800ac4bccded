"""The ``hsbench`` command: list, run, status, plot and export experiments declared in TOML specs.

Exit codes: 0 success; 1 some runs failed (``status``: failed or cancelled), nothing is stored
to plot or export, or the environment refused (sbatch, squeue, a download); 2 invalid spec,
arguments, paths, device or missing data (nothing is written or submitted); 130 interrupted
(Ctrl-C; a rerun resumes). Every error is one line on stderr. Paths (``experiments/``,
``results/``, ``plots/``) are relative to the current directory, normally the repository root.

This module wires the engine (``hsbench.engine``) to the registry of experiment kinds
(``hsbench.experiments.KINDS``); the engine itself imports no kind. torch, pandas, matplotlib
and submitit are imported by the commands that use them, never at the top, and a kind's module
imports none of them (``hsbench.engine.kind``): ``hsbench --help``, ``hsbench list`` and a rejected
spec answer at once (``tests/test_cli_speed.py``).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import NoReturn

from hsbench import data, report
from hsbench.check import DEFAULT_ATOL, DEFAULT_RTOL, compare
from hsbench.engine.kind import Field, run_device
from hsbench.engine.provenance import git_revision
from hsbench.engine.runner import DEFAULT_CHECKPOINT_INTERVAL_S, DEFAULT_DATA_DIR, RunOptions
from hsbench.engine.spec import DEFAULT_SCALE, MAX_RUNS, SLURM_FIELDS, Run, Spec, SpecError, find_spec, load_spec
from hsbench.engine.store import DEFAULT_RESULTS, FINAL, Store
from hsbench.experiments import KINDS

EXPERIMENTS_DIR = Path("experiments")
PLOTS_DIR = Path("plots")
STATE_ORDER = ("ok", "failed", "diverged", "pending", "running", "missing")  # always shown by status
RARE_STATES = ("cancelled", "unknown")  # shown by status when some run is in them
TABLE_FORMATS = ("csv", "parquet")  # every kind exports these; a kind declares others in export_formats


class UsageError(Exception):
    """Bad command-line input; reported in one line with exit code 2."""


class NoResults(Exception):
    """Nothing stored to plot or export; reported in one line with exit code 1."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.command(args)
    except (SpecError, UsageError) as e:
        print(f"hsbench: error: {e}", file=sys.stderr)
        return 2
    except NoResults as e:
        print(f"hsbench: {e}", file=sys.stderr)
        return 1
    # The except clauses below are evaluated only when an exception gets this far, so the modules
    # they name (and torch with them) are imported only then.
    except _refused() as e:
        print(f"hsbench: error: {e}", file=sys.stderr)
        return 1
    except _executors().Interrupted as e:
        finished = _counts(e.counts.elements()) if e.counts else "no run"
        print(f"hsbench: interrupted: {finished} finished; rerun the same command to resume", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("hsbench: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except OSError as e:  # e.g. a full disk or a folder that became unwritable
        where = f"{e.filename}: " if e.filename else ""
        print(f"hsbench: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


def _executors():
    from hsbench.engine import executors  # imports torch and submitit

    return executors


def _refused() -> tuple[type[Exception], ...]:
    """Errors that mean the environment refused (sbatch, the SLURM queue, a download): exit 1."""
    executors = _executors()
    return executors.SubmitError, executors.QueueUnavailable, data.DownloadError


class _Parser(argparse.ArgumentParser):
    """argparse's parser (its subcommands' too), its errors in one line with exit code 2 as every
    other error here: the usage it would print first is what ``--help`` is for."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hsbench", description="Run and plot the experiments declared in experiments/*.toml.")
    parser.add_argument("--version", action="version", version=f"hsbench {version('hsbench')}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p: argparse.ArgumentParser = sub.add_parser("list", help="list experiments and their scales")
    p.add_argument("--experiments", type=Path, default=EXPERIMENTS_DIR, help="folder of specs (default: experiments/)")
    p.set_defaults(command=cmd_list)

    def spec_command(
        name: str, help: str, command, results_help: str = "results folder (default: results/)"
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("spec", metavar="SPEC", help="experiment name (experiments/NAME.toml) or path to a spec")
        p.add_argument("--scale", default=DEFAULT_SCALE, help="named scale of the spec (default: default)")
        p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help=results_help)
        p.add_argument(
            "--max-runs",
            type=int,
            default=MAX_RUNS,
            metavar="N",
            help=f"refuse a sweep of more than N runs (default: {MAX_RUNS:,})",
        )
        p.set_defaults(command=command)
        return p

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--jobs", type=int, default=1, help="local worker processes (default: 1, in-process)")
        p.add_argument(
            "--checkpoint-every",
            type=float,
            default=DEFAULT_CHECKPOINT_INTERVAL_S,
            metavar="SECONDS",
            help=f"seconds between checkpoints of a long run (default: {DEFAULT_CHECKPOINT_INTERVAL_S:g})",
        )
        p.add_argument(
            "--data-dir",
            type=Path,
            default=DEFAULT_DATA_DIR,
            help="folder of the torchvision data sets (default: data/)",
        )
        p.add_argument("--device", help="torch device of the runs, e.g. cpu or cuda:1 (default: cuda if available)")

    p = spec_command("run", "run the spec's missing runs", cmd_run)
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--wait", action="store_true", help="slurm: block with a progress bar until the array is done")
    run_options(p)
    slurm = p.add_argument_group("SLURM parameters (override the spec's [slurm] table)")
    for name, field in SLURM_FIELDS.items():
        slurm.add_argument(f"--{name.replace('_', '-')}", type=field.type, help=field.doc)
    p = spec_command(
        "check",
        "run the spec's missing runs locally into a fresh results folder and compare their metrics with "
        "those of the same runs in a reference folder; exit 1 unless they agree (see hsbench.check)",
        cmd_check,
        results_help="the fresh results folder (default: a new temporary folder); runs already there are reused",
    )
    p.set_defaults(results=None, executor="local")
    p.add_argument("--against", type=Path, required=True, metavar="DIR", help="reference results folder, e.g. results")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative tolerance (default: {DEFAULT_RTOL:g})")
    p.add_argument(
        "--atol",
        type=float,
        default=DEFAULT_ATOL,
        help=f"differences this small count as none (default: {DEFAULT_ATOL:g})",
    )
    run_options(p)
    spec_command("status", "count ok / failed / diverged / pending / running / missing runs", cmd_status)
    p = spec_command("plot", "draw the experiment's figures from stored results into plots/", cmd_plot)
    p.add_argument(
        "--plots", type=Path, default=PLOTS_DIR, help="figures folder (default: plots/; other scales in a subfolder)"
    )
    p = sub.add_parser(
        "download", help="download a torchvision data set (both splits) into a data directory; needs internet"
    )
    p.add_argument("name", choices=data.TORCHVISION, help="data set")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="data directory (default: data/)")
    p.set_defaults(command=cmd_download)

    p = spec_command("export", "write the stored results as one table", cmd_export)
    p.add_argument(
        "--format",
        default="parquet",
        help="csv or parquet: one table (default: parquet); or a format of the spec's kind "
        "(kind optimizer-benchmark: deepobs); a format the kind lacks is rejected with its list",
    )
    return parser


def _spec(args: argparse.Namespace) -> Spec:
    spec = load_spec(find_spec(args.spec, EXPERIMENTS_DIR), KINDS)
    spec.resolve(args.scale)  # rejects an unknown scale
    return spec


def _counts(states) -> str:
    counts = collections.Counter(states)
    return ", ".join(f"{counts[s]} {s}" for s in STATE_ORDER + RARE_STATES if counts[s]) or "nothing to run"


def cmd_list(args: argparse.Namespace) -> int:
    for path in sorted(args.experiments.glob("*.toml")):
        try:
            spec = load_spec(path, KINDS)
        except SpecError as e:
            print(f"{path.stem:20} INVALID: {e}")
            continue
        print(f"{spec.name:20} {spec.kind.name:20} scales: {', '.join(spec.scale_names()):28} {spec.description}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = _spec(args)
    executors = _executors()
    runs = spec.runs(args.scale, args.max_runs)
    if args.jobs < 1:
        raise UsageError(f"--jobs: expected at least 1, got {args.jobs}")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every: expected seconds >= 0, got {args.checkpoint_every}")
    _device(args.device)
    params = _slurm_params(args, spec) if args.executor == "slurm" else {}
    _check_device(spec, args.device, params)
    if args.results.exists() and not args.results.is_dir():
        raise UsageError(f"--results {args.results}: not a folder")
    store = Store(args.results, spec.name)
    data_dir = args.data_dir.resolve()
    todo = [run for run in runs if (store.read_run(run) or {}).get("status") not in FINAL]
    _check_data(spec, todo, data_dir)
    if todo:
        _check_writable(args.results)
    options = RunOptions(
        results_dir=store.root.parent,
        checkpoint_interval_s=args.checkpoint_every,
        device=args.device,
        data_dir=data_dir,
    )
    header = f"{spec.name} (scale {args.scale}): {len(runs)} runs"
    if args.executor == "local":
        print(f"{header}, {len(runs) - len(todo)} already done; running {len(todo)} with {args.jobs} process(es)")
        counts = executors.run_local(todo, options, args.jobs)
        print(f"{spec.name}: {_counts(counts.elements())} (results in {store.root})")
        return 1 if counts["failed"] else 0

    if shutil.which("sbatch") is None:
        raise UsageError("--executor slurm: sbatch not found; use a SLURM login node or start slurm/start-cluster.sh")
    states, problem = executors.run_states(runs, store)
    if problem:
        raise executors.QueueUnavailable(f"cannot read the SLURM queue ({problem}); nothing submitted")
    todo = [run for run in runs if states[run.id] in ("missing", "failed", "cancelled")]
    print(f"{header}: {_counts(states.values())}")
    if todo:
        job_ids = executors.submit_slurm(todo, store, params, options)
        print(f"submitted SLURM array job(s) {' '.join(job_ids)} ({len(todo)} tasks); logs in {store.logs_dir}")
    if not args.wait:
        print(f"follow with: hsbench status {args.spec} --scale {args.scale} --results {args.results}")
        return 0
    states = executors.wait_slurm(runs, store)
    print(f"{spec.name}: {_counts(states.values())} (results in {store.root})")
    return 1 if {"failed", "missing", "cancelled"} & set(states.values()) else 0


def _check_device(spec: Spec, device: str | None, slurm: dict) -> None:
    """Reject, before anything runs, a device the kind does not compute on or that is not there."""
    kind = spec.kind
    if not slurm:  # local: this machine runs the runs
        import torch

        try:
            run_device(kind, device, torch.cuda.is_available())
        except ValueError as e:
            raise UsageError(str(e)) from None
        return
    gpus = slurm["gpus_per_node"]
    if device is not None and device.partition(":")[0] not in kind.devices:
        raise UsageError(f"--device {device}: kind {kind.name} runs on the {' or '.join(kind.devices)} only")
    if device is not None and device.startswith("cuda") and not gpus:
        raise UsageError(
            f"--device {device}: the SLURM jobs get no GPU; set --gpus-per-node (or [slurm] gpus_per_node)"
        )
    if gpus and "cuda" not in kind.devices:
        raise UsageError(f"--gpus-per-node {gpus}: kind {kind.name} runs on the CPU only; its jobs need no GPU")


def _check_data(spec: Spec, runs: list[Run], data_dir: Path) -> None:
    """Stop with one line if a data set that ``runs`` read is missing from ``data_dir``."""
    needed = sorted({name for run in runs for name in spec.kind.required_data(run.settings)})
    for name in needed:
        try:
            data.check_available(name, data_dir)
        except FileNotFoundError as e:
            raise UsageError(f"{spec.name}: {e}; nothing was run") from None


def _check_writable(results: Path) -> None:
    """Stop with one line unless ``results`` is (or can be made) a folder this process can write to."""
    if results.exists() and not results.is_dir():
        raise UsageError(f"--results {results}: not a folder")
    try:
        results.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=results):
            pass
    except OSError as e:
        raise UsageError(f"--results {results}: cannot write there ({e.strerror})") from None


def _device(device: str | None) -> str | None:
    """``--device`` checked as a torch device; None leaves the choice to each run (``kind.run_device``)."""
    if device is not None:
        import torch

        try:
            torch.device(device)
        except RuntimeError as e:
            raise UsageError(f"--device: {e}") from None
    return device


def _slurm_params(args: argparse.Namespace, spec: Spec) -> dict:
    params = spec.resolve(args.scale).slurm
    for name, field in SLURM_FIELDS.items():
        value = getattr(args, name)
        if value is not None:
            params[name] = _check(field, value, f"--{name.replace('_', '-')}")
    return params


def _check(field: Field, value, option: str):
    try:
        return field.check(value)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def cmd_check(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if not (args.rtol >= 0 and args.atol >= 0):
        raise UsageError(f"--rtol {args.rtol} --atol {args.atol}: expected tolerances >= 0")
    reference = Store(args.against, spec.name)
    if not reference.runs_dir.is_dir():
        raise UsageError(f"--against {args.against}: no records of {spec.name} in {reference.root}")
    if args.results is None:
        args.results = Path(tempfile.mkdtemp(prefix=f"hsbench-check-{spec.name}-"))
    fresh = Store(args.results, spec.name)
    if fresh.root.resolve() == reference.root.resolve():
        raise UsageError(f"--results {args.results}: the reference folder itself; check needs a fresh one")
    cmd_run(args)  # a failed run shows below as a status that differs
    agreement = compare(spec.runs(args.scale, args.max_runs), fresh, reference, args.rtol, args.atol)
    print(f"{spec.name} (scale {args.scale}): {fresh.root} against {reference.root}")
    for line in agreement.lines():
        print(f"  {line}")
    return 0 if agreement.passed else 1


def cmd_status(args: argparse.Namespace) -> int:
    spec = _spec(args)
    executors = _executors()
    runs = spec.runs(args.scale, args.max_runs)
    store = Store(args.results, spec.name)
    records = {run.id: store.read_run(run) for run in runs}
    states, problem = executors.run_states(runs, store, records)
    print(f"{spec.name} (scale {args.scale}): {len(runs)} runs")
    counts = collections.Counter(states.values())
    for state in STATE_ORDER + tuple(s for s in RARE_STATES if counts[s]):
        print(f"  {state:9} {counts[state]}")
    if problem:
        print(f"  the SLURM queue could not be read ({problem}): submitted runs without a record are unknown")
    revision = git_revision()
    stale = [i for i, rec in records.items() if rec is not None and rec["git_revision"] != revision]
    if stale:
        print(f"  {len(stale)} record(s) from another git revision than {revision}: {' '.join(stale)}")
    for run in runs:
        record = records[run.id]
        if states[run.id] in ("failed", "cancelled"):
            settings = " ".join(f"{k}={v}" for k, v in run.settings.items())
            why = "left the SLURM queue before it started (e.g. scancel)"  # cancelled, no record
            if record is not None:
                why = (record["error"] or "?").strip().splitlines()[-1]
            print(f"  {states[run.id]} {run.id} [{settings}]: {why}")
    return 1 if counts["failed"] or counts["cancelled"] else 0


def _frame(args: argparse.Namespace, spec: Spec):
    store = Store(args.results, spec.name)
    runs = spec.runs(args.scale, args.max_runs)
    df = store.frame(args.scale, {run.id for run in runs if store.read_run(run) is not None})
    if df.empty:
        raise NoResults(f"{spec.name}: no stored results at scale {args.scale} in {store.root}; run it first")
    return store, df


def cmd_plot(args: argparse.Namespace) -> int:
    spec = _spec(args)
    store, df = _frame(args, spec)
    try:
        store.compact(df, args.scale, "parquet")
    except OSError as e:  # the table is a by-product: plotting needs no write access to results/
        print(f"hsbench: note: compacted table not written ({e.strerror})", file=sys.stderr)
    outdir = args.plots if args.scale == DEFAULT_SCALE else args.plots / args.scale
    outputs = spec.kind.plot(df, spec, outdir)
    for path in outputs:
        print(path)
    run_versions = (record["versions"] for record in map(store.read, df["run_id"]) if record is not None)
    print(report.write(spec, args.scale, df, outputs, outdir, args.results, run_versions))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if args.format not in TABLE_FORMATS + spec.kind.export_formats:
        formats = ", ".join(TABLE_FORMATS + spec.kind.export_formats)
        raise UsageError(f"--format {args.format}: kind {spec.kind.name} exports only {formats}")
    store, df = _frame(args, spec)
    _check_writable(store.root)
    if args.format in TABLE_FORMATS:
        print(store.compact(df, args.scale, args.format))
        return 0
    print(spec.kind.export(df, spec, args.format, store.root / f"{spec.name}-{args.scale}-{args.format}"))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    data.download(args.name, args.data_dir)
    print(f"{args.name} in {args.data_dir.resolve()}")
    return 0
