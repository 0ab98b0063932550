# Two commands take a fresh machine (Python >= 3.10 only) to a working state:
#   make run    set up .venv and decode a sample prompt
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
DEMO   := $(VENV)/demo-model

.PHONY: run test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

$(DEMO)/config.json: $(VENV)/.installed
	$(BIN)/s2d2 init-random --family sdar --out $(DEMO) --seed 0

run: $(DEMO)/config.json
	$(BIN)/s2d2 generate "The quick brown fox" --model $(DEMO) --method s2d2 --max-new-tokens 32

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
