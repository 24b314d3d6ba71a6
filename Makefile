# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make demo   install, then run the main job on the shipped model
#   make test   install (with the dev extra), then lint and run the test suite
# and `make serve` installs the UI's extra, then serves the shipped model (docs/webui.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first: on this project's machines `torch==2.13.0` is the CPU build on local disk; any torch
# that satisfies the project's range is kept as it is.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
SERVE_ARGS ?=

.PHONY: demo serve test lint format install install-dev install-ui browser clean bench bench-train bench-annotators \
	bench-sdxl

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-torch: | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.installed-torch
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# The web UI's extra (Gradio), for controlnet serve.
$(VENV)/.installed-ui: pyproject.toml $(VENV)/.installed-torch
	$(BIN)/python -m pip install --quiet -e ".[ui]"
	touch $@

# controlnet_aux (the annotators' oracle) without its dependencies: it requires torchvision, which
# does not install beside the pinned torch; the tests import only its modules that need none of it.
$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed-torch
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps "controlnet-aux==0.0.10"
	touch $@

# The browser tests drive Debian's chromium (never a downloaded browser): install it when missing.
browser:
	@command -v chromium >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
		else sudo apt-get update -qq && sudo apt-get install -y -qq chromium; fi; }

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-ui: $(VENV)/.installed-ui

demo: install
	$(BIN)/controlnet demo

# The page, the JSON API and the AUTOMATIC1111 API on the shipped model, at http://127.0.0.1:7860
# until Ctrl-C; options go in SERVE_ARGS (make serve SERVE_ARGS="--port 8000 --auth ada:secret").
serve: install-ui
	$(BIN)/controlnet serve $(SERVE_ARGS)

lint: install-dev
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts

format: install-dev
	$(BIN)/ruff format src tests benchmarks scripts
	$(BIN)/ruff check --fix src tests benchmarks scripts

test: lint browser
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

# Speed against diffusers (benchmarks/): one guided step, then a whole 20-step 512x512 image.
# Options for both scripts: make bench BENCH_ARGS="--quick" (or --variants a,b,c,d, --sizes 512,256, ...).
bench: install-dev
	$(BIN)/python benchmarks/bench_step.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_image.py $(BENCH_ARGS)

# Training speed against diffusers' train_controlnet.py logic (SD 1.5 size, 256x256, 7-14 minutes).
bench-train: install-dev
	$(BIN)/python benchmarks/bench_train.py $(BENCH_ARGS)

# Network annotators against controlnet_aux on the same weight files, 512x512 photo; BENCH_ARGS: --quick,
# --annotators-dir DIR (real weights where present, else random), --only a,b, --rounds N.
bench-annotators: install-dev
	$(BIN)/python benchmarks/bench_annotators.py $(BENCH_ARGS)

# SDXL + one full SDXL ControlNet at 1024x1024 in bf16 against diffusers' StableDiffusionXLControlNetPipeline:
# s/step and peak memory, each peer alone in its own process (about 15-25 minutes on 2 cores; the first run
# also writes 19 GB of random weights to ~/.cache/controlnet-bench/sdxl). BENCH_ARGS: --steps N, --size N,
# --peers ours,diffusers, --compile, --dry-run (a reduced SDXL at 256 px: checks the script).
bench-sdxl: install-dev
	$(BIN)/python benchmarks/bench_sdxl.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
