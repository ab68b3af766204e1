# The two set-up commands (README): `make demo` runs the workflow on the built-in demo,
# `make test` runs the test suite. Both create .venv on first use.
# The first of python3.11, python3.12, python3.13, python3 that is >= 3.11 (override: make PYTHON=...).
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all

.PHONY: venv demo test report dag clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "histosynth needs Python 3.11 or newer (3.11, 3.12, 3.13): none found on PATH;" \
		"install one, or name it: make PYTHON=/path/to/python3.x"; exit 1; }
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
