# Two commands do everything: `make reproduce` and `make test`.
#   make reproduce [PROFILE=smoke|default|paper] [MASSIVE_DIR=path]
#   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= default
# Where MASSIVE 1.1 lies (1.1/data/<locale>.jsonl or the official tarball); downloaded there if absent.
MASSIVE_DIR ?= data/massive
export MASSIVE_DIR

.PHONY: reproduce test unit nbval venv clean-runs

venv: $(VENV)/.installed

# torch first, pinned: an unpinned torch would pull a CUDA build of several GB.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

reproduce: venv
	$(PY) -m compactnlu.reproduce --profile $(PROFILE)

test: unit nbval

unit: venv
	$(PY) -m pytest tests

# Every numbered notebook, executed top to bottom on the smoke profile.
nbval: venv
	COMPACTNLU_PROFILE=smoke $(PY) -m pytest --nbval-lax -p no:cacheprovider notebooks

clean-runs:
	rm -rf runs
