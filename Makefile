# Two commands take a fresh machine (Python >= 3.10 only) to a working state:
#   make run    set up .venv and decode a sample prompt
#   make test   set up .venv and run the whole test suite (CI)
#   make check  the fast set while working
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH  ?= torch==2.13.0
# A problem in the bundled model's format (see src/s2d2/bundled/README.md); the answer is 33.
PROBLEM := Q: Lily wants to read 60 pages. She reads 12 pages on Monday and 15 pages on Tuesday. How many more pages does she need to read?\nA:

.PHONY: run test check setup clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev,eval,serve]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/s2d2 generate "$$(printf '$(PROBLEM)')"

# Everything (what CI runs), then the 15 slowest tests.
test: $(VENV)/.installed browser
	$(BIN)/python -m pytest -q --durations=15

# The fast set while working (under two minutes on a 2-core CPU): every test not marked slow.
check: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

# Chromium from the system packages, for the playground's browser test (tests/test_playground.py); where it cannot
# be installed (not root, no apt-get), that one test is skipped with a message and the rest runs.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } || \
	echo "note: Chromium could not be installed; the playground's browser test will be skipped"

clean:
	rm -rf $(VENV) .pytest_cache
