"""The ``hsbench`` command: list, run, status, plot and export experiments declared in TOML specs.

Exit codes: 0 success; 1 some runs failed or have no record, or nothing is stored to plot
or export; 2 invalid spec or arguments (nothing is written). Paths (``experiments/``,
``results/``, ``plots/``) are relative to the current directory, normally the repository root.

This module wires the engine (``hsbench.engine``) to the registry of experiment kinds
(``hsbench.experiments.KINDS``); the engine itself imports no kind.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
from pathlib import Path

import torch

from hsbench.data import TORCHVISION, torchvision_dataset
from hsbench.engine import executors
from hsbench.engine.kind import Field
from hsbench.engine.provenance import git_revision
from hsbench.engine.runner import DEFAULT_CHECKPOINT_INTERVAL_S, DEFAULT_DATA_DIR, RunOptions
from hsbench.engine.spec import DEFAULT_SCALE, SLURM_FIELDS, Spec, SpecError, find_spec, load_spec
from hsbench.engine.store import DEFAULT_RESULTS, FINAL, Store
from hsbench.experiments import KINDS

EXPERIMENTS_DIR = Path("experiments")
PLOTS_DIR = Path("plots")
STATE_ORDER = ("ok", "failed", "diverged", "pending", "running", "missing")
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hsbench", description="Run and plot the experiments declared in experiments/*.toml."
    )
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list experiments and their scales")
    p.add_argument("--experiments", type=Path, default=EXPERIMENTS_DIR, help="folder of specs (default: experiments/)")
    p.set_defaults(command=cmd_list)

    def spec_command(name: str, help: str, command) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("spec", metavar="SPEC", help="experiment name (experiments/NAME.toml) or path to a spec")
        p.add_argument("--scale", default=DEFAULT_SCALE, help="named scale of the spec (default: default)")
        p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results folder (default: results/)")
        p.set_defaults(command=command)
        return p

    p = spec_command("run", "run the spec's missing runs", cmd_run)
    p.add_argument("--executor", choices=("local", "slurm"), default="local")
    p.add_argument("--jobs", type=int, default=1, help="local worker processes (default: 1, in-process)")
    p.add_argument("--wait", action="store_true", help="slurm: block with a progress bar until the array is done")
    p.add_argument(
        "--checkpoint-every",
        type=float,
        default=DEFAULT_CHECKPOINT_INTERVAL_S,
        metavar="SECONDS",
        help=f"seconds between checkpoints of a long run (default: {DEFAULT_CHECKPOINT_INTERVAL_S:g})",
    )
    p.add_argument(
        "--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of the torchvision data sets (default: data/)"
    )
    p.add_argument("--device", help="torch device of the runs, e.g. cpu or cuda:1 (default: cuda if available)")
    slurm = p.add_argument_group("SLURM parameters (override the spec's [slurm] table)")
    for name, field in SLURM_FIELDS.items():
        slurm.add_argument(f"--{name.replace('_', '-')}", type=field.type, help=field.doc)
    spec_command("status", "count ok / failed / diverged / pending / running / missing runs", cmd_status)
    p = spec_command("plot", "draw the experiment's figures from stored results into plots/", cmd_plot)
    p.add_argument(
        "--plots", type=Path, default=PLOTS_DIR, help="figures folder (default: plots/; other scales in a subfolder)"
    )
    p = sub.add_parser(
        "download", help="download a torchvision data set (both splits) into a data directory; needs internet"
    )
    p.add_argument("name", choices=TORCHVISION, help="data set")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="data directory (default: data/)")
    p.set_defaults(command=cmd_download)

    p = spec_command("export", "write the stored results as one table", cmd_export)
    kind_formats = {fmt: name for name, kind in KINDS.items() for fmt in kind.export_formats}
    p.add_argument(
        "--format",
        choices=TABLE_FORMATS + tuple(kind_formats),
        default="parquet",
        help="csv or parquet: one table; "
        + "; ".join(f"{fmt}: kind {name} only" for fmt, name in kind_formats.items()),
    )
    return parser


def _spec(args: argparse.Namespace) -> Spec:
    spec = load_spec(find_spec(args.spec, EXPERIMENTS_DIR), KINDS)
    spec.resolve(args.scale)  # rejects an unknown scale
    return spec


def _counts(states) -> str:
    counts = collections.Counter(states)
    return ", ".join(f"{counts[s]} {s}" for s in STATE_ORDER if counts[s]) or "nothing to run"


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
    runs = spec.runs(args.scale)
    if args.jobs < 1:
        raise UsageError(f"--jobs: expected at least 1, got {args.jobs}")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every: expected seconds >= 0, got {args.checkpoint_every}")
    store = Store(args.results, spec.name)
    options = RunOptions(
        results_dir=store.root.parent,
        checkpoint_interval_s=args.checkpoint_every,
        device=_device(args.device),
        data_dir=args.data_dir.resolve(),
    )
    header = f"{spec.name} (scale {args.scale}): {len(runs)} runs"
    if args.executor == "local":
        todo = [run for run in runs if (store.read_run(run) or {}).get("status") not in FINAL]
        print(f"{header}, {len(runs) - len(todo)} already done; running {len(todo)} with {args.jobs} process(es)")
        counts = executors.run_local(todo, options, args.jobs)
        print(f"{spec.name}: {_counts(counts.elements())} (results in {store.root})")
        return 1 if counts["failed"] else 0

    params = _slurm_params(args, spec)
    if shutil.which("sbatch") is None:
        raise UsageError("--executor slurm: sbatch not found; use a SLURM login node or start slurm/start-cluster.sh")
    states = executors.run_states(runs, store)
    todo = [run for run in runs if states[run.id] in ("missing", "failed")]
    print(f"{header}: {_counts(states.values())}")
    if todo:
        job_ids = executors.submit_slurm(todo, store, params, options)
        print(f"submitted SLURM array job(s) {' '.join(job_ids)} ({len(todo)} tasks); logs in {store.logs_dir}")
    if not args.wait:
        print(f"follow with: hsbench status {args.spec} --scale {args.scale} --results {args.results}")
        return 0
    states = executors.wait_slurm(runs, store)
    print(f"{spec.name}: {_counts(states.values())} (results in {store.root})")
    return 1 if {"failed", "missing"} & set(states.values()) else 0


def _device(device: str | None) -> str | None:
    """``--device`` checked as a torch device; None leaves the choice to each run (cuda if available)."""
    if device is not None:
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


def cmd_status(args: argparse.Namespace) -> int:
    spec = _spec(args)
    runs = spec.runs(args.scale)
    store = Store(args.results, spec.name)
    states = executors.run_states(runs, store)
    print(f"{spec.name} (scale {args.scale}): {len(runs)} runs")
    counts = collections.Counter(states.values())
    for state in STATE_ORDER:
        print(f"  {state:9} {counts[state]}")
    revision = git_revision()
    records = {run.id: store.read_run(run) for run in runs}
    stale = [i for i, rec in records.items() if rec is not None and rec["git_revision"] != revision]
    if stale:
        print(f"  {len(stale)} record(s) from another git revision than {revision}: {' '.join(stale)}")
    for run in runs:
        record = records[run.id]
        if states[run.id] == "failed" and record is not None:  # a record, as its state is not "missing"
            settings = " ".join(f"{k}={v}" for k, v in run.settings.items())
            print(f"  failed {run.id} [{settings}]: {record['error'].strip().splitlines()[-1]}")
    return 0


def _frame(args: argparse.Namespace, spec: Spec):
    store = Store(args.results, spec.name)
    df = store.frame(args.scale, {run.id for run in spec.runs(args.scale) if store.read_run(run) is not None})
    if df.empty:
        raise NoResults(f"{spec.name}: no stored results at scale {args.scale} in {store.root}; run it first")
    return store, df


def cmd_plot(args: argparse.Namespace) -> int:
    spec = _spec(args)
    store, df = _frame(args, spec)
    store.compact(df, args.scale, "parquet")
    outdir = args.plots if args.scale == DEFAULT_SCALE else args.plots / args.scale
    for path in spec.kind.plot(df, spec, outdir):
        print(path)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    spec = _spec(args)
    if args.format not in TABLE_FORMATS + spec.kind.export_formats:
        formats = ", ".join(TABLE_FORMATS + spec.kind.export_formats)
        raise UsageError(f"--format {args.format}: kind {spec.kind.name} exports only {formats}")
    store, df = _frame(args, spec)
    if args.format in TABLE_FORMATS:
        print(store.compact(df, args.scale, args.format))
        return 0
    print(spec.kind.export(df, spec, args.format, store.root / f"{spec.name}-{args.scale}-{args.format}"))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    for train in (True, False):
        torchvision_dataset(args.name, args.data_dir, train, download=True)
    print(f"{args.name} in {args.data_dir.resolve()}")
    return 0
