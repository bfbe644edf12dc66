# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
CODE   := connector tests bench examples protos
# The suite and the demo start about a hundred Python processes: let them reuse compiled
# modules (some environments set this to keep source trees free of __pycache__).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test test-quick suite suite-quick fuzz lint style typecheck protos bench soak clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed; run: make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# One worker more than cores (pytest-xdist): a worker often waits on a server or a
# subprocess (2 cores: 136 s with 3 workers against 162 s with 2). All tests of a module go
# to one worker, so a server the module shares starts once; modules start in the order
# tests/conftest.py gives them (the long ones first).
WORKERS ?= $(shell $(PYTHON) -c 'import os; print(len(os.sched_getaffinity(0)) + 1)')
# A run writes about 470 MB of scratch files (660 DuckDB files, homes, audit logs): kept on
# a RAM disk (/dev/shm, when it has 2 GiB free) a run took 92 s instead of 100 (median of 3
# each). pytest keeps only the folders of failed tests (pyproject.toml), so little stays.
SCRATCH ?= $(shell $(PYTHON) -c 'import os, shutil; d = "/dev/shm"; print(d if os.path.isdir(d) and os.access(d, os.W_OK) and shutil.disk_usage(d).free > 2**31 else "")')
PYTEST := $(if $(SCRATCH),TMPDIR=$(SCRATCH)) $(PY) -m pytest -n $(WORKERS) --dist loadscope --no-loadscope-reorder

# The type check (about 15 s of one core on a fresh clone) runs beside the suite, whose
# workers spend part of their time waiting on servers; style is checked first, in a second.
test: style
	@$(MAKE) --no-print-directory -j2 typecheck suite

# Everything but the tests marked slow (a few seconds or more each): for quick iteration.
test-quick: style
	@$(MAKE) --no-print-directory -j2 typecheck suite-quick

suite: $(STAMP)
	$(PYTEST)

suite-quick: $(STAMP)
	$(PYTEST) -m "not slow"

# The fuzz targets run briefly in `make test`; this runs them long: FUZZ_EXAMPLES random
# inputs per target (default 5000: about 15 minutes on 2 busy cores). Failures print the input.
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=long FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-5000} $(PY) -m pytest tests/fuzz -q --hypothesis-show-statistics

lint: style typecheck

style: $(STAMP)
	$(VENV)/bin/ruff check $(CODE)
	$(VENV)/bin/ruff format --check $(CODE)

typecheck: $(STAMP)
	$(VENV)/bin/mypy connector tests bench

protos: $(STAMP)
	$(PY) protos/generate.py connector/_proto

# Big answers, tiny queries, cached decisions and concurrent peers in one run (see bench/):
# BENCH_ARGS="--load-seconds 20" for the issue-13 load length.
bench: $(STAMP)
	$(PY) -m bench.stream $(BENCH_ARGS)
	$(PY) -m bench.federation

# A bounded mixed load against a real server (not part of `make test`): SOAK_ARGS="--duration 600".
soak: $(STAMP)
	$(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache demo-space
