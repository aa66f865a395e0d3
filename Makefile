# Tessera: every target creates or updates .venv itself (bpy 5.0.1 needs Python 3.11).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_SCENE := resources/scenes/demo.blend
PYTEST_ARGS ?=

# Find a Python 3.11: an explicit PYTHON=..., python3.11 on PATH, or python3 if it is 3.11.
PYTHON ?= $(shell for p in python3.11 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
	&& { command -v $$p; break; }; done)

.PHONY: demo test bench load soak screenshots app lint venv clean system-deps

# System packages the tests use for real (bubblewrap for the render sandbox; a UI Blender,
# Xvfb and xdotool for the add-on's UI tests and files saved by an older Blender),
# installed with apt where this runs as root and they are missing; elsewhere it says what
# to install.
SYSTEM_PACKAGES := bwrap:bubblewrap blender:blender Xvfb:xvfb xdotool:xdotool
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "Installing$$missing (apt)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: install$$missing for the sandbox tests (e.g. sudo apt-get install$$missing)"; fi; \
	fi

venv: $(STAMP)

$(STAMP): pyproject.toml
	@if [ -z "$(PYTHON)" ]; then \
	  echo "error: Python 3.11 not found. Blender's bpy 5.0.1 module exists for Python 3.11 only."; \
	  echo "  Install it (e.g. 'apt-get install python3.11 python3.11-venv', 'pyenv install 3.11'"; \
	  echo "  or 'uv python install 3.11') and re-run, or pass PYTHON=/path/to/python3.11."; \
	  exit 1; fi
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[blender,dev]'
	@touch $(STAMP)

$(DEMO_SCENE): resources/scenes/make_demo.py $(STAMP)
	$(PY) -I resources/scenes/make_demo.py $(DEMO_SCENE)

demo: $(STAMP) $(DEMO_SCENE)
	$(VENV)/bin/tessera demo

test: $(STAMP) system-deps
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP) $(DEMO_SCENE)
	$(PY) -m benchmarks.run_all

load: $(STAMP)
	$(PY) -m benchmarks.bench_load --db both

soak: $(STAMP) $(DEMO_SCENE)
	$(PY) -m benchmarks.soak

screenshots: $(STAMP) $(DEMO_SCENE)
	QT_QPA_PLATFORM=offscreen $(PY) -m resources.screenshots

app: $(STAMP)
	$(VENV)/bin/tessera app

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) out benchmarks/results $(DEMO_SCENE) .mypy_cache .ruff_cache .pytest_cache
