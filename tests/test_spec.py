"""Spec validation, scales and run expansion."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hsbench.cli import main
from hsbench.engine.kind import Field
from hsbench.engine.spec import load_spec, run_id
from hsbench.experiments import KINDS

VALID = """
kind = "quadratic"
[settings]
dim = 4
[grid]
optimizer = ["sgd", "adam"]
lr = [0.1, 0.01]
[seeds]
count = 2
"""

# (spec text, field that the one-line error must name)
MALFORMED = [
    ('kind = "quadratic\n', "invalid TOML"),
    ('kind = "quadratic"\nfoo = 1\n', "foo"),
    ("[settings]\ndim = 3\n", "kind"),
    ('kind = "cubic"\n', "kind"),
    ('kind = "quadratic"\n[settings]\ndimension = 3\n', "settings.dimension"),
    ('kind = "quadratic"\n[settings]\ndim = "ten"\n', "settings.dim"),
    ('kind = "quadratic"\n[settings]\ndim = true\n', "settings.dim"),
    ('kind = "quadratic"\n[settings]\ndim = 0\n', "settings.dim"),
    ('kind = "quadratic"\n[settings]\nlr = nan\n', "settings.lr"),
    ('kind = "quadratic"\n[settings]\nseed = 3\n', "settings.seed"),
    ('kind = "quadratic"\nsettings = 3\n', "settings"),
    ('kind = "quadratic"\n[grid]\noptimizer = ["sgd", "lbfgs"]\n', "grid.optimizer[1]"),
    ('kind = "quadratic"\n[grid]\nlr = 0.1\n', "grid.lr"),
    ('kind = "quadratic"\n[grid]\nlr = []\n', "grid.lr"),
    ('kind = "quadratic"\n[grid]\nlr = [0.1, 0.1]\n', "grid.lr"),
    ('kind = "quadratic"\n[settings]\nlr = 0.1\n[grid]\nlr = [0.2]\n', "grid.lr"),
    ('kind = "quadratic"\n[seeds]\ncount = 2\nlist = [1]\n', "seeds"),
    ('kind = "quadratic"\n[seeds]\ncount = 0\n', "seeds.count"),
    ('kind = "quadratic"\n[seeds]\nlist = [1, -2]\n', "seeds.list[1]"),
    ('kind = "quadratic"\n[seeds]\nnumber = 2\n', "seeds.number"),
    ('kind = "quadratic"\n[scales.smoke]\nsteps = 3\n', "scales.smoke.steps"),
    ('kind = "quadratic"\n[scales.smoke.settings]\nsteps = 2.5\n', "scales.smoke.settings.steps"),
    ('kind = "quadratic"\n[scales.smoke.grid]\noptimizer = ["newton"]\n', "scales.smoke.grid.optimizer[0]"),
    ('kind = "quadratic"\n[slurm]\ngpus = 1\n', "slurm.gpus"),
    ('kind = "quadratic"\n[slurm]\ntime_min = 0\n', "slurm.time_min"),
    ('kind = "quadratic"\n[scales.paper.slurm]\nmem_gb = "lots"\n', "scales.paper.slurm.mem_gb"),
]


@pytest.mark.parametrize("text, field", MALFORMED, ids=[f for _, f in MALFORMED])
def test_malformed_spec_rejected_naming_file_and_field(text, field, write_spec, tmp_path, capsys):
    spec = write_spec(text)
    results = tmp_path / "results"
    assert main(["run", str(spec), "--results", str(results)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hsbench: error: {spec}: {field}"), err
    assert "\n" not in err
    assert not results.exists()


def test_unknown_scale_and_bad_flag_rejected(write_spec, tmp_path, capsys):
    spec = write_spec(VALID)
    results = tmp_path / "results"
    assert main(["run", str(spec), "--scale", "huge", "--results", str(results)]) == 2
    assert f"{spec}: scales.huge: unknown scale; choose from default" in capsys.readouterr().err
    assert main(["run", str(spec), "--executor", "slurm", "--time-min", "0", "--results", str(results)]) == 2
    assert "--time-min: 0 is below the minimum 1" in capsys.readouterr().err
    assert not results.exists()


def test_grid_expands_to_product_times_seeds_with_defaults_filled(write_spec):
    runs = load_spec(write_spec(VALID), KINDS).runs()
    assert len(runs) == 2 * 2 * 2
    assert len({r.id for r in runs}) == 8
    assert [(r.settings["optimizer"], r.settings["lr"], r.settings["seed"]) for r in runs[:3]] == [
        ("sgd", 0.1, 0),
        ("sgd", 0.1, 1),
        ("sgd", 0.01, 0),
    ]
    assert runs[0].settings == {
        "dim": 4, "condition": 100.0, "optimizer": "sgd", "lr": 0.1, "steps": 200,
        "noise": 0.0, "fail_at_step": -1, "seed": 0, "scale": "default",
    }  # fmt: skip


def test_ids_stable_so_adding_seeds_or_points_adds_only_new_runs(write_spec):
    before = {r.id for r in load_spec(write_spec(VALID), KINDS).runs()}
    more = VALID.replace("count = 2", "count = 3").replace("[0.1, 0.01]", "[0.1, 0.01, 1]")
    after = {r.id for r in load_spec(write_spec(more), KINDS).runs()}
    assert before < after and len(after) == 2 * 3 * 3
    # an int where a float is expected, and key order, do not change ids
    reordered = VALID.replace("[0.1, 0.01]", "[0.1, 0.01]\n").replace("dim = 4", "dim = 4\nlr = 1")
    reordered = reordered.replace('optimizer = ["sgd", "adam"]\nlr = [0.1, 0.01]\n', 'optimizer = ["sgd", "adam"]\n')
    one = load_spec(write_spec(reordered), KINDS).runs()
    assert one[0].settings["lr"] == 1.0 and isinstance(one[0].settings["lr"], float)
    assert one[0].id == load_spec(write_spec(reordered.replace("lr = 1", "lr = 1.0")), KINDS).runs()[0].id


def test_scales_override_settings_grid_seeds_and_slurm(write_spec):
    spec = load_spec(
        write_spec(
            VALID
            + """
[slurm]
time_min = 30
[scales.smoke.settings]
steps = 5
optimizer = "adam"
[scales.smoke.grid]
dim = [2, 3]
[scales.smoke.seeds]
list = [7]
[scales.smoke.slurm]
time_min = 5
"""
        ),
        KINDS,
    )
    assert spec.scale_names() == ["default", "smoke"]
    smoke = spec.runs("smoke")
    assert [(r.settings["dim"], r.settings["lr"]) for r in smoke] == [(2, 0.1), (3, 0.1), (2, 0.01), (3, 0.01)]
    assert {(r.settings["optimizer"], r.settings["steps"], r.settings["seed"], r.settings["scale"]) for r in smoke} == {
        ("adam", 5, 7, "smoke")
    }
    assert not {r.id for r in smoke} & {r.id for r in spec.runs("default")}
    assert spec.resolve("smoke").slurm["time_min"] == 5 and spec.resolve("default").slurm["time_min"] == 30


def test_field_choices_may_come_from_a_callable():
    methods = ["hesscale", "ggn"]
    field = Field(str, "curvature method", choices=lambda: methods)
    assert field.check("ggn") == "ggn"
    methods.append("bl89")  # looked up when checking, not when declaring
    assert field.check("bl89") == "bl89"
    with pytest.raises(ValueError, match="unknown value 'adahessian'; choose from hesscale, ggn, bl89"):
        field.check("adahessian")


def test_checked_in_specs_are_valid():
    specs = sorted((Path(__file__).parents[1] / "experiments").glob("*.toml"))
    assert specs
    for path in specs:
        for scale in load_spec(path, KINDS).scale_names():
            assert load_spec(path, KINDS).runs(scale)


def test_engine_imports_no_experiment_kind():
    engine = "hsbench.engine.spec, hsbench.engine.runner, hsbench.engine.executors, hsbench.engine.store"
    code = f"import sys, {engine}; print(sorted(m for m in sys.modules if m.startswith('hsbench.experiments')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_run_ids_hash_only_settings_that_differ_from_the_defaults(write_spec):
    run = load_spec(write_spec('kind = "quadratic"\n[settings]\noptimizer = "adam"\nsteps = 200\n'), KINDS).runs()[0]
    assert run.settings["steps"] == 200 and run.settings["noise"] == 0.0  # both the defaults
    assert run.id == run_id("quadratic", {}, {"optimizer": "adam", "seed": 0, "scale": "default"})
