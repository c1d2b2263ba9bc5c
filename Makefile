# Two commands set everything up on a fresh machine:
#   make reproduce   # venv + install + data + `qkvlab reproduce` (quick preset)
#   make test        # venv + install + test data + the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install reproduce test data-test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/qkvlab data fetch quick
	$(BIN)/qkvlab reproduce

data-test: $(STAMP)
	$(BIN)/qkvlab data fetch test

test: data-test
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
