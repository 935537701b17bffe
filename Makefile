# fitserve: `make serve` runs the server on the default model, `make test` runs the test suite.
# Both create .venv and fetch the default model on first use; later runs skip what is already done.

PYTHON ?= python3
VENV ?= .venv
# CPU build by default. CUDA users: make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128" serve
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test
BIN := $(VENV)/bin
STAMP := $(VENV)/.fitserve-installed
PYTEST_ARGS ?=

.PHONY: install model serve test test-unit test-gpu test-gptq clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, so that installing the package never pulls another torch build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

install: $(STAMP)

model: $(STAMP)
	$(BIN)/fitserve model fetch

serve: model
	$(BIN)/fitserve serve --host 127.0.0.1 --port 8000

test: model
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: model
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

test-gpu: model
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

# GPTQ through GPTQModel (the `gptq` extra) pins numpy 2.2.6, so its tests get a venv of their own.
GPTQ_VENV ?= .venv-gptq
test-gptq: model
	test -x $(GPTQ_VENV)/bin/python || $(PYTHON) -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(GPTQ_VENV)/bin/python -m pip install --quiet -e '.[test,gptq]'
	GPTQMODEL_CPU_WORKERS=2 $(GPTQ_VENV)/bin/python -m pytest tests/unit/test_gptq.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(GPTQ_VENV) build *.egg-info
