# Two commands are all a user needs: `make bench` and `make test`. Each sets itself up first.
#
# Set-up: if python3 already has everything the lab needs (a GPU box with a CUDA build of torch, say), it is used
# as it is; otherwise a .venv is made with the CPU build of torch (TORCH_SPEC) and the project installed into it.

SYSTEM_PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
READY := $(shell $(SYSTEM_PYTHON) -c "import torch, triton, typer, rich, pandas, matplotlib, pytest" >/dev/null 2>&1 && echo yes)

ifeq ($(READY),yes)
PY := $(SYSTEM_PYTHON)
SETUP :=
else
PY := $(VENV)/bin/python
SETUP := $(VENV)/.installed
endif

.PHONY: setup test bench report

setup: $(SETUP)

$(VENV)/.installed: pyproject.toml
	$(SYSTEM_PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -q

# The whole journey on whatever device is here; pass more flags with ARGS="--levels 0,4 --tokens 2048".
bench: setup
	$(PY) -m cli.aisp bench run -t moe_journey $(ARGS)

# Rebuild the tables and plots of a run folder from its rows (default: the newest run).
report: setup
	$(PY) -m cli.aisp bench report $(RUN)
