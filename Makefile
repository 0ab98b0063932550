# Two commands take a fresh machine (Python >= 3.10 only) to a working state:
#   make run    set up .venv and decode a sample prompt
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# A problem in the bundled model's format (see src/s2d2/bundled/README.md); the answer is 36.
PROBLEM := Q: Emma has 91 pounds. She buys 5 mugs that cost 11 pounds each. How many pounds does she have left?\nA:

.PHONY: run test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,eval,serve]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/s2d2 generate "$$(printf '$(PROBLEM)')"

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
