# Two commands matter: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
export UV_PYTHON_DOWNLOADS := never

.PHONY: run test install lint bench migrate clean

# uv itself is installed from PyPI at a pinned version into a private folder, so a fresh
# machine needs nothing but Python 3.11.
$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

# Bytecode is compiled at install: with PYTHONDONTWRITEBYTECODE set (as in our containers and on
# some machines) every process would otherwise compile ~300 modules from source, ~0.9 s per start.
install: $(UV)
	$(UV) sync --frozen --quiet --compile-bytecode
	$(VENV)/bin/python -m compileall -q -j 0 shared services bench

run: install
	$(VENV)/bin/oa-machine up

test: install
	$(VENV)/bin/pytest $(PYTEST_ARGS)

migrate: install
	$(VENV)/bin/oa-machine migrate

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy shared services

bench: install
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) $(TOOLS) var .pytest_cache .mypy_cache .ruff_cache
