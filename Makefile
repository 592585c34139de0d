# Two commands set everything up from nothing: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-12)
STAMP := $(VENV)/.installed-base-$(HASH)
# the development extras on top: test tools and TensorFlow for the detector's reference path
DEV_STAMP := $(VENV)/.installed-dev-$(HASH)
DEMO_OUT ?= runs/demo

.PHONY: demo test lint format env dev-env bench clean wheel wheel-check calibration

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first: a CPU wheel of 2.13.0 is on the development machines' disk; a bare `torch`
# requirement would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dlib]"
	rm -f $(VENV)/.installed-base-*
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[dlib,onnx,dev,tensorflow]"
	rm -f $(VENV)/.installed-dev-*
	touch $(DEV_STAMP)

env: $(STAMP)

dev-env: $(DEV_STAMP)

lint: dev-env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: dev-env
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The shipped dlib landmark error model (pipeline/fit/error_models/dlib.json, docs/fit.md): renders
# of seed 1 (the demo renders seed 0), calibrated with dlib; the identity prior weight held to the
# real photos of ../shared/fixtures/faces when they are there (REAL_PHOTOS=DIR for others, empty
# for none). Put the sha256 it prints into data_manifest.yaml (models.landmark_error.dlib).
CAL_OUT ?= runs/calibration
REAL_PHOTOS ?= $(wildcard ../shared/fixtures/faces)
calibration: env
	$(BIN)/morphset synth --out $(CAL_OUT)/synthetic --subjects 30 --images-per-subject 8 --seed 1 --yaw-range -40 40
	$(BIN)/morphset calibrate $(CAL_OUT)/synthetic --landmarks dlib --work-run $(CAL_OUT)/run \
		$(if $(REAL_PHOTOS),--real-photos $(REAL_PHOTOS)) -o pipeline/fit/error_models/dlib.json

test: dev-env lint
	$(BIN)/python -m pytest -q -ra

demo: env
	$(BIN)/morphset demo --out $(DEMO_OUT)

# The wheel a user installs: built here, installed into a fresh virtual environment (packages from
# the local cache), then run from another directory with no repository around it.
WHEEL_CHECK ?= $(CURDIR)/build/wheel-check
wheel: env
	rm -rf dist
	$(BIN)/pip wheel --quiet --no-deps -w dist .

wheel-check: wheel
	rm -rf $(WHEEL_CHECK)
	$(PYTHON) -m venv $(WHEEL_CHECK)/venv
	$(WHEEL_CHECK)/venv/bin/pip install --quiet "torch==2.13.0"
	$(WHEEL_CHECK)/venv/bin/pip install --quiet "$$(ls $(CURDIR)/dist/morphset-*.whl)[dlib]"
	cd $(WHEEL_CHECK) && venv/bin/morphset synth --out faces --subjects 2 --images-per-subject 2 --workers 1 --json >synth.json
	cd $(WHEEL_CHECK) && venv/bin/morphset build run --dataset synthetic --root faces --landmarks dlib \
		--scheduler sync --no-progress --json >build.json
	cd $(WHEEL_CHECK) && venv/bin/morphset status run --json | $(PYTHON) -m json.tool >status.json
	# every stage ran from the wheel alone, the fit with the shipped dlib error model (package data)
	cd $(WHEEL_CHECK) && $(PYTHON) -c "import json; s = json.load(open('status.json')); \
		assert all(s[k]['done'] == s[k]['shards'] >= 1 for k in ('detect', 'fit', 'export')), s; print('wheel check: ok')"

bench: dev-env
	for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
