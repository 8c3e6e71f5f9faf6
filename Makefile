# The README's commands. Everything runs from a virtualenv in .venv that the
# first target to need it creates (a fresh machine needs only python3 and make).
PYTHON ?= python3
VENV ?= .venv
# Extra pip arguments for the install, e.g. PIP_ARGS="-c .ci/lowest.txt" (the floors).
PIP_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck unit docs bench bench-quick bench-instructions dashboards screenshot clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]' $(PIP_ARGS)
	touch $(STAMP)

## The main job: the demo app instrumented by SigTrace, serving /metrics.
## `make demo PORT=8001` picks the port; DEMO_ARGS passes more (e.g. --raw-spans).
PORT ?= 8000
DEMO_ARGS ?=
demo: $(STAMP)
	@$(BIN)/python -m examples.demo --port $(PORT) $(DEMO_ARGS)

## The whole test suite: lint, strict typing, then pytest.
test: lint typecheck unit

lint: $(STAMP)
	$(BIN)/ruff check sigtrace tests benchmarks examples grafana deploy docs
	$(BIN)/ruff format --check sigtrace

typecheck: $(STAMP)
	$(BIN)/mypy --strict sigtrace

unit: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

## The README's picture of the signals page (docs/images/ui.png): the browser test
## (headless Chromium; Debian's chromium and chromium-driver) saves it.
screenshot: $(STAMP)
	UI_SCREENSHOT=docs/images/ui.png $(BIN)/pytest tests/test_ui_browser.py -q -p no:cacheprovider

## The documentation (docs/, Sphinx): warnings are errors, every reference must resolve;
## -E reads every page each time, so a warning is never hidden by an earlier build.
docs: $(STAMP)
	$(BIN)/sphinx-build -E -W --keep-going -n -q -b html docs docs/_build/html

## Benchmarks: per-send and per-request, side by side with the peers.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick

## Instructions per request under valgrind's callgrind (Debian: valgrind): steady figures.
bench-instructions: $(STAMP)
	$(BIN)/python -m benchmarks.instructions

## Regenerate the Grafana dashboards from grafana/generate.py.
dashboards: $(STAMP)
	$(BIN)/python -m grafana.generate

clean:
	rm -rf $(VENV) .venv-* .pytest_cache .mypy_cache .ruff_cache docs/_build
