# fcl_ext — the README's commands. Each target sets up what it needs, idempotently:
# a second run neither reinstalls torch nor rebuilds unchanged sources.
#
#   make demo        venv + torch + build, then the main job (both trainers' demos)
#   make compare-demo  GLFC and baselines x 2 seeds on the bundled digits -> one table
#   make test        venv + torch + build, then the test suite + benchmark smoke run
#   make test-slow   the slow cases, incl. one round of every paper preset at full size (about 40 min here;
#                    the first time also writes the synthetic same-size sets: FCL_EXT_FULLSIZE_CACHE=DIR keeps them)
#   make bench       benchmarks (CPU, and CUDA where a GPU exists) -> docs/performance.md
#   make gpu-check OUT=dir   on a GPU machine, with the Python that already has torch
#
# Overrides: PYTHON=python3.11  TORCH_SPEC="torch==2.13.0"  VENV=.venv  MAX_JOBS=2

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY         := $(VENV)/bin/python
STAMPS     := $(VENV)/.fcl_ext
DEPS       := numpy pyyaml tqdm matplotlib scikit-learn scipy pytest pytest-benchmark hypothesis ninja setuptools wheel "flwr[simulation]>=1.22"
PYTEST_ARGS ?=
OUT        ?= gpu-check-out
export MAX_JOBS ?= 2

.PHONY: all install build demo compare-demo test test-slow bench gpu-check clean info

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is installed only when the venv cannot import it (TORCH_SPEC picks the build).
$(STAMPS)/torch: | $(PY)
	@mkdir -p $(STAMPS)
	@$(PY) -c "import torch" 2>/dev/null && echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')" \
	  || $(PY) -m pip install $(TORCH_SPEC)
	@touch $@

$(STAMPS)/deps: $(STAMPS)/torch
	$(PY) -m pip install -q $(DEPS)
	@touch $@

# The editable install (packages + console script `fcl-ext`) happens once and compiles
# nothing; build_ext --inplace compiles the extension and afterwards only what changed (ninja).
$(STAMPS)/install: $(STAMPS)/deps
	FCL_EXT_SKIP_EXT=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

install: $(STAMPS)/install

build: $(STAMPS)/install
	$(PY) setup.py -q build_ext --inplace

info: build
	$(PY) -c "import fcl_ext, json; print(json.dumps(fcl_ext.info(), indent=2))"

demo: build
	$(PY) -m python_api.demo

# GLFC + finetune / LwF / iCaRL / joint x 2 seeds on the bundled digits, then the table (docs/baselines.md)
compare-demo: build
	$(PY) -m python_api.cli compare-demo --jobs 2

test: build
	$(PY) -m pytest -m "not slow" tests --durations=10 $(PYTEST_ARGS)
	$(PY) -m pytest benchmarks --benchmark-disable -q

test-slow: build
	$(PY) -m pytest -m slow tests $(PYTEST_ARGS)

bench: build
	@mkdir -p .benchmarks
	$(PY) -m pytest benchmarks -q --benchmark-json=.benchmarks/latest.json \
	  --benchmark-columns=median,iqr,rounds --benchmark-group-by=group --benchmark-sort=name $(PYTEST_ARGS)
	$(PY) -m benchmarks.report .benchmarks/latest.json

# On a GPU machine: no venv, no downloads; the Python that already has torch (>= 2.4) plus
# numpy, pytest, pytest-benchmark, hypothesis (pyyaml + matplotlib for the trainer smoke runs).
# At most 8 minutes: builds in place with every core for the visible GPU's arch, checks each op
# (CUDA vs CPU vs reference), runs the CUDA tests, the trainers on cuda vs cpu and the benchmarks,
# each step with its own time budget; OUT/summary.md (and OUT/ops/<op>.md) say what it found.
# `$(PYTHON) -m benchmarks.gpu_check --plan` prints the steps and budgets without a GPU.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --out $(OUT)

clean:
	rm -rf build fcl_ext/_C*.so fcl_ext/_build_info.py .benchmarks
