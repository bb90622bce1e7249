# Two entry points, each doing its own set-up on a fresh machine:
#   make demo   a local swarm of six peers classifying held-out images, ending in a table
#   make test   the whole test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp
DATA   := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: demo test evaluate setup debian-packages lint clean

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

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e '.[train,sim,dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/python -m sim.demo

test: setup
	$(VENV)/bin/python -m pytest -q

evaluate: setup
	$(VENV)/bin/python -m variants.evaluate --out out/evaluation

lint: setup
	$(VENV)/bin/ruff check swarm sim variants tests
	$(VENV)/bin/python -m mypy

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
