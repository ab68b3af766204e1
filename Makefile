# The two set-up commands (README): `make demo` runs the workflow on the built-in demo,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: venv demo test report dag clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

demo: venv
	$(BIN)/snakemake --cores $(CORES) --resources gpu=1

test: venv
	$(BIN)/python -m pytest

report: venv
	$(BIN)/snakemake --report results/report.html

dag: venv
	$(BIN)/snakemake results/report/rulegraph.png --cores 1 --forcerun rule_graph

clean:
	rm -rf results logs .snakemake
