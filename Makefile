# The two set-up commands (README): `make demo` runs the workflow on the built-in demo,
# `make test` runs the test suite. Both create .venv on first use.
# The first of python3.11, python3.12, python3.13, python3 that is >= 3.11 (override: make PYTHON=...).
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
	&& { echo $$p; break; }; done)
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
PROFILE ?=

.PHONY: venv demo test report dag clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "histosynth needs Python 3.11 or newer (3.11, 3.12, 3.13): none found on PATH;" \
		"install one, or name it: make PYTHON=/path/to/python3.x"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

# A GPU: profiles/default (one GPU job at a time). None: profiles/cpu (small model jobs one thread each,
# as many at once as there are cores). Override: make demo PROFILE=profiles/...
demo: venv
	@profile="$(PROFILE)"; if [ -z "$$profile" ]; then \
		if [ "$$($(BIN)/python -c 'import torch; print(torch.cuda.is_available())')" = True ]; then \
			profile=profiles/default; else profile=profiles/cpu; fi; fi; \
	echo "make demo: workflow profile $$profile"; \
	set -x; $(BIN)/snakemake --workflow-profile $$profile --cores $(CORES)

test: venv
	$(BIN)/python -m pytest

report: venv
	$(BIN)/snakemake --report results/report.html

dag: venv
	$(BIN)/snakemake results/report/rulegraph.png --cores 1 --forcerun rule_graph

clean:
	rm -rf results logs .snakemake
