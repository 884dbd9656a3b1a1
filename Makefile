# blip2-train developer commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN := $(shell grep -E '^torch==' constraints.txt)
PYTEST_ARGS ?=

.PHONY: help install test test-all demo bench gpu-kit clean

help: ## list targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, alone and pinned: see constraints.txt
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv with the package and its dependencies (CPU torch)

test: install ## run the test suite (CI runs this; gpu-marked tests run through the GPU check's dry run)
	$(PY) -m pytest -m "not slow and not gpu" -n 2 --dist loadfile --durations=15 $(PYTEST_ARGS)

test-all: install ## run every test, slow ones included (gpu-marked ones: run_scripts/gpu_check.sh on a GPU)
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

demo: install ## synthetic data -> stage 1 -> evaluation, on CPU, in minutes
	bash run_scripts/demo.sh

bench: install ## CPU-sized benchmarks on the synthetic data (figures into docs/benchmarks.md)
	bash run_scripts/bench.sh

gpu-kit: install ## wheels for the GPU check (.gpu-kit/, ~7 MB; needs a package registry): run_scripts/gpu_check.sh
	$(PY) run_scripts/gpu_kit.py build --out .gpu-kit

clean: ## remove build outputs (keeps .venv)
	rm -rf outputs build *.egg-info .pytest_cache
