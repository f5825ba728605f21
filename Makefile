# ComfyUI-TurboDiffusion developer commands.
#   make setup  - idempotent: .venv with runtime + test deps and a ComfyUI host
#   make test   - lint + the whole test suite (CPU)
#   make demo   - the main job: headless ComfyUI queues the T2V workflow and writes an MP4

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
TORCH_CPU_VERSION := 2.13.0
# An existing ComfyUI checkout can be used instead of the one make setup installs.
COMFYUI_DIR ?= $(CURDIR)/.comfyui/ComfyUI
export COMFYUI_DIR

.PHONY: setup test lint demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile tools/install_comfyui.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch>=2.6"; \
	else \
		$(PY) -m pip install -q torch==$(TORCH_CPU_VERSION); \
	fi
	$(PY) -m pip install -q -e ".[test]" "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	$(PY) tools/install_comfyui.py "$(COMFYUI_DIR)"
	touch $(STAMP)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: setup lint
	$(PY) -m pytest

demo: setup
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) .comfyui .pytest_cache .ruff_cache
