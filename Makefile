# Two commands are all a user needs: `make bench` and `make test`. Each sets itself up first. Then, with the same
# set-up: `make level N=4 ARGS="--preset small --tokens 256"` runs one level's script, `make report` rebuilds a run's
# summary.md and plots and prints where they are.
#
# Set-up: if python3 already has everything a target needs (a GPU box with a CUDA build of torch, say), it is
# used as it is; otherwise a .venv is made with the CPU build of torch (TORCH_SPEC) and the project installed in it.

SYSTEM_PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
LAB_MODULES := tomllib, torch, triton, typer, rich, pandas, matplotlib, PIL, tabulate  # tomllib: Python 3.11 or newer
TEST_MODULES := $(LAB_MODULES), pytest
# yes if SYSTEM_PYTHON imports every module of the comma-separated list $(1)
has = $(shell $(SYSTEM_PYTHON) -c "import $(1)" >/dev/null 2>&1 && echo yes)

ifeq ($(call has,$(LAB_MODULES)),yes)
BENCH_PY := $(SYSTEM_PYTHON)
BENCH_SETUP :=
else
BENCH_PY := $(VENV)/bin/python
BENCH_SETUP := $(VENV)/.installed
endif

ifeq ($(call has,$(TEST_MODULES)),yes)
TEST_PY := $(SYSTEM_PYTHON)
TEST_SETUP :=
else
TEST_PY := $(VENV)/bin/python
TEST_SETUP := $(VENV)/.installed
endif

.PHONY: test bench report level

$(VENV)/.installed: pyproject.toml
	@$(SYSTEM_PYTHON) -c "import sys; sys.exit(sys.version_info < (3, 11))" || { \
	echo "error: $(SYSTEM_PYTHON) is Python $$($(SYSTEM_PYTHON) -V 2>&1 | cut -d' ' -f2); the lab needs 3.11 or" \
	"newer: make ... SYSTEM_PYTHON=python3.12" >&2; exit 2; }
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

test: $(TEST_SETUP)
	$(TEST_PY) -m pytest -q

# The whole journey on whatever device is here; pass more flags with ARGS="--levels 0,4 --tokens 2048".
bench: $(BENCH_SETUP)
	$(BENCH_PY) -m cli.aisp bench run -t moe_journey $(ARGS)

# Rebuild the tables and plots of a run folder from its rows (default: the newest run); prints summary.md's path.
report: $(BENCH_SETUP)
	$(BENCH_PY) -m cli.aisp bench report $(RUN)

# One level's script by its key (N=0 … 10, peer, peer-fp8, peer-ogs or ep), its options in ARGS:
# make level N=4 ARGS="--preset small --tokens 256". The numbered levels are levelN_*.py; the others are named here.
LEVEL_FILE_peer := peer_torch_grouped_mm
LEVEL_FILE_peer-fp8 := peer_torch_scaled_grouped_mm
LEVEL_FILE_peer-ogs := peer_triton_kernels_matmul_ogs
LEVEL_FILE_ep := level_ep_expert_parallel
LEVEL_SCRIPT = $(if $(N),$(firstword $(wildcard labs/moe_optimization_journey/level$(N)_*.py \
                                                labs/moe_optimization_journey/$(LEVEL_FILE_$(N)).py)))

level: $(BENCH_SETUP)
	@test -n "$(LEVEL_SCRIPT)" || { \
	echo "make level: no level N=$(N); use N=0 … 10, peer, peer-fp8, peer-ogs or ep" >&2; exit 2; }
	$(BENCH_PY) $(LEVEL_SCRIPT) $(ARGS)
