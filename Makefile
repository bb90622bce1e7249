# Entry points, each doing its own set-up on a fresh machine:
#   make demo   a local swarm of six peers classifying held-out images, ending in a table
#   make view   a local swarm with its live page, until Ctrl-C (installs no PyTorch)
#   make test   the whole test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp
VIEW_STAMP := $(VENV)/.runtime-stamp
CHROMIUM := /usr/bin/chromium
DATA   := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: demo view test evaluate setup debian-packages browser lint clean

setup: $(STAMP) debian-packages

# Debian packages: the dataset, iproute2 (network namespaces), dnsutils (dig, to check
# that a standard DNS-SD client sees the peers). Installed only when something is missing.
debian-packages:
	@if [ -f $(DATA) ] && command -v ip >/dev/null && command -v dig >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian packages: dataset-fashion-mnist iproute2 dnsutils"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    dataset-fashion-mnist iproute2 dnsutils >/dev/null; \
	else \
	  echo "error: missing Debian packages; run: sudo apt-get install dataset-fashion-mnist iproute2 dnsutils" >&2; \
	  exit 1; \
	fi

# Debian's chromium, for the page's browser test (Playwright drives it; it never
# downloads a browser of its own). Installed only when missing.
browser:
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian package: chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium >/dev/null; \
	else \
	  echo "error: missing Debian package; run: sudo apt-get install chromium" >&2; \
	  exit 1; \
	fi

# The runtime alone (no extras: no PyTorch), for make view; a full install covers it.
$(VIEW_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e .
	touch $(VIEW_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[train,sim,dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/python -m sim.demo

view: $(VIEW_STAMP) debian-packages
	$(VENV)/bin/python -m sim.view

test: setup browser
	$(VENV)/bin/python -m pytest -q

evaluate: setup
	$(VENV)/bin/python -m variants.evaluate --out out/evaluation

lint: setup
	$(VENV)/bin/ruff check swarm sim variants tests
	$(VENV)/bin/python -m mypy

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
