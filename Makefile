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

# The same chain at toy size (runs/demo-quick, about 4 minutes); tests/test_demo.py runs it in CI.
demo-quick: env
	@PYTHON_BIN=$(PY) bash launch/demo.sh --quick

# The suite in $(TEST_WORKERS) worker processes (pytest-xdist), one thread each: on 2 cores they
# overlap what one process leaves idle (interpreter start-ups, imports, waiting on subprocesses); the
# tests of the one 2-process launch share a worker (xdist_group "launch"). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: env
	@if [ "$(TEST_WORKERS)" != 0 ]; then export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}; fi; \
	echo "$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)"; \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

clean-demo:
	rm -rf runs/demo runs/demo-quick
