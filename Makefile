# The two commands a newcomer needs. Both do all set-up themselves (venv + installs).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stillroom-installed

.PHONY: test demo setup clean

setup: $(STAMP)

# torch is installed first, pinned, so that pip never resolves a newer multi-GB CUDA build on a
# CPU machine; the package and its dev extras follow and find torch already satisfied. The dev extras
# build llama.cpp from source (llama-cpp-python; pip keeps the built wheel), without its multimodal part.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install -q --disable-pip-version-check -e ".[dev]"
	$(PY) -c "import stillroom, torch, transformers"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/stillroom demo

clean:
	rm -rf $(VENV) runs .pytest_cache
