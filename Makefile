# Two commands set everything up on a fresh machine:
#   make reproduce   # venv + install + data + `qkvlab reproduce` (quick preset)
#   make test        # venv + install + test data + the test suite
# PyTorch is pinned here (the version CI runs), not in the package, which accepts torch>=2.5,<3.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0
# Test processes (pytest-xdist): two halve the suite's time on a 2-core machine (measured 10 min 57 s -> 5 min 32 s);
# each test still runs whole in one process. TEST_WORKERS=0 runs it in this process. Work stealing: an idle process
# takes tests queued for the other, so the suite does not end on one process finishing a long queue alone (measured
# 4 min 43 s for 493 s of tests, 2026-12-05).
TEST_WORKERS ?= 2

.PHONY: install reproduce lint test test-fast data-test wheel-check bench-peers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/qkvlab data fetch quick
	$(BIN)/qkvlab reproduce

# Ruff (pycodestyle, pyflakes, import order, bugbear, pyupgrade) on the package and benchmarks, mypy on the
# package; config in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check qkvlab benchmarks tests
	$(BIN)/mypy

data-test: $(STAMP)
	$(BIN)/qkvlab data fetch test

test: data-test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

test-fast: data-test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal -m "not slow"

# Build the wheel, install it with the pinned PyTorch into a fresh venv, run it outside the source tree.
wheel-check: $(STAMP)
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation -w "$$tmp/dist" . ; \
	rm -rf build; \
	$(PYTHON) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install --quiet '$(TORCH)'; \
	"$$tmp/venv/bin/pip" install --quiet "$$tmp"/dist/qkvlab-*.whl; \
	cd "$$tmp" && venv/bin/qkvlab variants > variants.txt && \
	venv/bin/python -c "import qkvlab; assert '$$tmp' in qkvlab.__file__, qkvlab.__file__" && \
	venv/bin/python -c "from qkvlab.nn.kv_decode import HEADERS, SOURCES; assert all(s.is_file() for s in SOURCES + HEADERS), SOURCES" && \
	QKVLAB_KERNEL_DIR="$$tmp/kernels" venv/bin/python -c "from qkvlab.nn.kv_decode import library; library()" && \
	echo "wheel-check: $$(ls dist) installs and runs ($$(wc -l < variants.txt) lines from qkvlab variants)"

# The peers of `qkvlab bench`: Hugging Face (the [bench] extra) and litgpt. litgpt's own requirements pin
# huggingface_hub below what transformers 5 needs, so its model code and the few packages `import litgpt.model`
# loads go into a directory of their own inside the venv, put on PYTHONPATH for the benchmark only.
LITGPT_DIR := $(VENV)/litgpt
LITGPT_PKGS := litgpt==0.5.13 lightning==2.6.6 lightning-utilities torchmetrics jsonargparse docstring-parser \
	typeshed-client psutil
BENCH_ARGS ?= --threads 2 --contexts 512 2048 --batches 1 4 --repeats 7 --fused-rotary

$(LITGPT_DIR)/.installed: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/pip install --quiet --no-deps --target $(LITGPT_DIR) $(LITGPT_PKGS)
	touch $@

bench-peers: $(LITGPT_DIR)/.installed
	PYTHONPATH=$(LITGPT_DIR) $(BIN)/qkvlab bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
