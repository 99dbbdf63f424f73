# silomesh: one command to set up and run the demo, one to set up and run the tests.
#   make demo   # creates .venv, installs silomesh, runs a small simnet (4 real peers)
#   make test   # creates .venv, installs silomesh with dev tools and the browser-test deps
#               # (Debian's chromium + chromium-driver via apt), runs `make lint` (ruff, mypy),
#               # then the whole suite: a lint failure fails the tests, and so CI
# Prerequisites (Debian/Ubuntu): see README.md.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver

.PHONY: venv demo test lint bench clean browser-deps net-deps

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "silomesh needs Python >= 3.11 (found " + sys.version.split()[0] + ")")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/silomesh simnet run

test: $(STAMP) lint browser-deps net-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The dashboard's browser tests drive Debian's headless Chromium through chromedriver.
browser-deps:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; \
	elif command -v sudo >/dev/null 2>&1; then SUDO=sudo; \
	else echo "the browser tests need $(CHROMIUM) and $(CHROMEDRIVER): install Debian's 'chromium' and 'chromium-driver' packages (as root: apt-get install chromium chromium-driver)" >&2; exit 1; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get here: install chromium and its chromedriver, and point SILOMESH_CHROMIUM / SILOMESH_CHROMEDRIVER at them" >&2; exit 1; fi; \
	$$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver

# The network test bed (tests/netbed.py: namespaces, NAT, rate limits) needs nftables. Without
# root it cannot run at all, and its tests skip with that reason; so only root installs here.
net-deps:
	@if command -v nft >/dev/null 2>&1 || [ "$$(id -u)" != 0 ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then echo "no apt-get here: install nftables for the network test bed" >&2; exit 0; fi; \
	apt-get install -y --no-install-recommends nftables || { apt-get update && apt-get install -y --no-install-recommends nftables; }

# mypy checks protocol/ and strategies/ as --strict would (pyproject.toml's [[tool.mypy.overrides]]).
# The folders are the silomesh.* packages only through setuptools' package-dir mapping, which mypy
# cannot read: without the linked tree below, every `from silomesh.x import y` would be Any.
TYPECHECK := .typecheck
PACKAGES := peer protocol strategies models simnet cli audit
lint: $(STAMP)
	$(BIN)/ruff check .
	@mkdir -p $(TYPECHECK)/silomesh
	@for d in $(PACKAGES); do ln -sfn ../../$$d $(TYPECHECK)/silomesh/$$d; done
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy -p silomesh

bench: $(STAMP)
	$(BIN)/python bench/bench_codec.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
