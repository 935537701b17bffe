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

.PHONY: install model serve test test-unit test-gpu test-gptq test-ray fuzz check-manifests lint typecheck wheel-check clean

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

# schemathesis against the live server's /openapi.json (fixed seed, time-boxed): zero 5xx, zero schema violations.
fuzz: model
	$(BIN)/python -m pytest tests/integration/test_fuzz_openapi.py $(PYTEST_ARGS)

# GPTQ through GPTQModel (the `gptq` extra) pins numpy 2.2.6, so its tests get a venv of their own.
GPTQ_VENV ?= .venv-gptq
test-gptq: model
	test -x $(GPTQ_VENV)/bin/python || $(PYTHON) -m venv $(GPTQ_VENV)
	$(GPTQ_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(GPTQ_VENV)/bin/python -m pip install --quiet -e '.[test,gptq]'
	GPTQMODEL_CPU_WORKERS=2 $(GPTQ_VENV)/bin/python -m pytest tests/unit/test_gptq.py $(PYTEST_ARGS)

# Kubernetes manifests (deploy/k8s), offline: Kubernetes and CRD schemas, then fitserve's rules; the broken
# fixtures (tests/fixtures/k8s) must fail. kubernetes-validate comes from the `k8s` extra, part of `test`.
check-manifests: $(STAMP)
	$(BIN)/python deploy/k8s/check_manifests.py
	$(BIN)/python -m pytest -q tests/unit/test_k8s_manifests.py $(PYTEST_ARGS)

# Scale-out on Ray Serve (the `ray` extra) in its own venv: Ray pins its own dependency ranges, and the core venv
# must keep running without Ray (tests/conftest.py skips collecting tests/ray/ where Ray is not installed).
RAY_VENV ?= .venv-ray
test-ray: model
	test -x $(RAY_VENV)/bin/python || $(PYTHON) -m venv $(RAY_VENV)
	$(RAY_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(RAY_VENV)/bin/python -m pip install --quiet -e '.[test,ray]'
	$(RAY_VENV)/bin/python -m pytest tests/ray $(PYTEST_ARGS)

# ruff (lint + format) and mypy; the tools come from the `dev` extra.
DEV_STAMP := $(VENV)/.fitserve-dev-installed
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS),dev]'
	touch $@

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# mypy names modules by their folders; a link tree gives the folders their installed names (fitserve.*).
TYPECHECK_DIR := .typecheck
typecheck: $(DEV_STAMP)
	rm -rf $(TYPECHECK_DIR) && mkdir -p $(TYPECHECK_DIR)/fitserve
	ln -s ../../src/fitserve/__init__.py $(TYPECHECK_DIR)/fitserve/__init__.py
	for pkg in quant server loadtest; do ln -s ../../$$pkg $(TYPECHECK_DIR)/fitserve/$$pkg; done
	cd $(TYPECHECK_DIR) && ../$(BIN)/mypy --config-file ../pyproject.toml $(TYPECHECK_PACKAGES)
TYPECHECK_PACKAGES ?= -p fitserve.quant -p fitserve.server -p fitserve.loadtest

# Build the wheel and the sdist, install the wheel (not editable) into a fresh venv, run the installed command.
WHEEL_VENV ?= .venv-wheel
wheel-check: $(DEV_STAMP)
	rm -rf dist $(WHEEL_VENV) && mkdir -p dist
	$(BIN)/python -m build --outdir dist . >dist/build.log 2>&1 || { cat dist/build.log; exit 1; }
	! grep -i "deprecat" dist/build.log  # the build prints no deprecation warning (issue 12)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install --quiet $(TORCH_SPEC)
	$(WHEEL_VENV)/bin/python -m pip install --quiet dist/fitserve-*.whl
	cd /tmp && $(CURDIR)/$(WHEEL_VENV)/bin/fitserve --help >/dev/null
	cd /tmp && $(CURDIR)/$(WHEEL_VENV)/bin/python -m fitserve plan --help >/dev/null
	for name in server quant loadtest; do cd /tmp && ! $(CURDIR)/$(WHEEL_VENV)/bin/python -c "import $$name" 2>/dev/null || exit 1; done
	@echo "wheel-check: $$(ls dist/*.whl dist/*.tar.gz) install and run"

clean:
	rm -rf $(VENV) $(GPTQ_VENV) $(RAY_VENV) $(WHEEL_VENV) $(TYPECHECK_DIR) build dist *.egg-info
