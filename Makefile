# Two commands are all a user needs: `make bench` and `make test`. Each sets itself up first.
#
# Set-up: if python3 already has everything a target needs (a GPU box with a CUDA build of torch, say), it is
# used as it is; otherwise a .venv is made with the CPU build of torch (TORCH_SPEC) and the project installed in it.

SYSTEM_PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
LAB_MODULES := torch, triton, typer, rich, pandas, matplotlib
has = $(shell $(SYSTEM_PYTHON) -c "import $(1)" >/dev/null 2>&1 && echo yes)

ifeq ($(call has,$(LAB_MODULES)),yes)
BENCH_PY := $(SYSTEM_PYTHON)
BENCH_SETUP :=
else
BENCH_PY := $(VENV)/bin/python
BENCH_SETUP := $(VENV)/.installed
endif

ifeq ($(call has,$(LAB_MODULES), pytest),yes)
TEST_PY := $(SYSTEM_PYTHON)
TEST_SETUP :=
else
TEST_PY := $(VENV)/bin/python
TEST_SETUP := $(VENV)/.installed
endif

.PHONY: test bench report

$(VENV)/.installed: pyproject.toml
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

test: $(TEST_SETUP)
	$(TEST_PY) -m pytest -q

# The whole journey on whatever device is here; pass more flags with ARGS="--levels 0,4 --tokens 2048".
bench: $(BENCH_SETUP)
	$(BENCH_PY) -m cli.aisp bench run -t moe_journey $(ARGS)

# Rebuild the tables and plots of a run folder from its rows (default: the newest run).
report: $(BENCH_SETUP)
	$(BENCH_PY) -m cli.aisp bench report $(RUN)
