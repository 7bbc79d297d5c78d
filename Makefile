# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BENCH_VENV ?= .bench-venv

.PHONY: run test test-unit bench soak lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Start the daemon in the foreground on 127.0.0.1 (TCP); prints the URL, token and a curl line.
run: $(STAMP)
	$(VENV)/bin/kcserver --transport tcp $(ARGS)

## Run the whole test suite (tests/unit and tests/integration, against real ipykernel kernels).
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## Run only the fast half: no kernel, no daemon (tests/unit), in seconds.
test-unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

## Benchmarks: kallichore-trio vs raw jupyter_client vs Jupyter Server (docs/performance.md).
$(BENCH_VENV)/.installed-stamp: bench/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet -r bench/requirements.txt
	touch $@

bench: $(STAMP) $(BENCH_VENV)/.installed-stamp
	$(PY) bench/run_all.py --jupyter-server-python $(BENCH_VENV)/bin/python $(BENCH_ARGS)

## Resume soak: 1,000,000 lines through 100 disconnects and 5 daemon kills (docs/performance.md).
soak: $(STAMP)
	$(PY) bench/soak_resume.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info
