# The two commands: `make run` (the app, real model) and `make test` (the offline suite).
# Both create or reuse .venv in the repo root and install what they need, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint venv clean-venv

$(VENV)/.installed-runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt requirements.txt $(VENV)/.installed-runtime
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed-runtime

run: $(VENV)/.installed-runtime
	$(PY) app.py $(ARGS)

test: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
