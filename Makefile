# The two commands of the README: `make demo` and `make test`. Both create or reuse the
# virtual environment in $(VENV) first (see launch/setup_env.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV

.PHONY: demo demo-quick test env clean-demo

env:
	@bash launch/setup_env.sh

demo: env
	@PYTHON_BIN=$(PY) bash launch/demo.sh

# The same chain at toy size (runs/demo-quick, 2-3 minutes); tests/test_demo.py runs it in CI.
demo-quick: env
	@PYTHON_BIN=$(PY) bash launch/demo.sh --quick

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-demo:
	rm -rf runs/demo runs/demo-quick
