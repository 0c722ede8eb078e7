# gradhub: `make demo` sets up and trains a local cluster; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
ARGS ?=

.PHONY: setup demo test protos k8s docker-engine clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/gradhub run $(ARGS)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

protos: setup
	$(BIN)/python scripts/generate_protos.py

k8s: setup
	$(BIN)/python scripts/render_k8s.py

# Debian's Docker engine and mmdebstrap (a base image without a registry), for the container
# tests; they start and stop the engine themselves. Needs root.
docker-engine:
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io mmdebstrap iptables

clean:
	rm -rf $(VENV) runs .pytest_cache
