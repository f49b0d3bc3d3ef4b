# The two commands a newcomer needs:  `make up`  (run the system)   `make test`  (run every test).
# Both install what they need first into .venv, pinned by requirements.lock.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# this machine's pip config names extra local indexes that may be absent: drop pip's noise about them
QUIET := 2>&1 | sed '/is ignored: it is neither/d'
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# XGBoost's idle OpenMP threads must not spin on 2 shared cores (notebooks, tests, services inherit this)
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install up test test-fast test-slow bench lab export clean-nbs lint check-sync lock system-deps docs readme

$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" $(QUIET)
	$(BIN)/python -m pip install -q -c requirements.lock -e ".[dev]" $(QUIET)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "fraud-detection (.venv)" >/dev/null
	$(BIN)/python -m pip check
	@touch $(STAMP)

install: $(STAMP)

## Run the whole system on embedded defaults (broker, SQLite online store, parquet offline store).
up: install
	$(BIN)/fraud up

## Every test: notebook asserts (nbdev_test, including the kafka flag) + pytest (real broker, Redis, PostgreSQL, HTTP, browser).
test: install system-deps check-sync lint
	$(BIN)/nbdev_test --n_workers 2 --flags kafka --timing
	$(BIN)/pytest -m "not slow" -n 2 --dist loadfile  # two test files at a time: most tests wait on services

test-slow: install system-deps
	$(BIN)/pytest -m slow

bench: install
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

## JupyterLab on nbs/ with the project's kernel.
lab: install
	$(BIN)/jupyter lab nbs/

export: install
	$(BIN)/nbdev_export

clean-nbs: install
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_clean --fname scheduled

## CI guard: notebooks are clean and fraud_detection/ is exactly what nbs/ exports.
check-sync: install
	$(BIN)/nbdev_clean && $(BIN)/nbdev_clean --fname scheduled && $(BIN)/nbdev_export
	@git diff --exit-code --stat -- nbs scheduled fraud_detection || \
	  (echo "nbs/ and fraud_detection/ are out of sync or notebooks are not clean: run 'make export clean-nbs' and commit" && exit 1)

lint: install
	$(BIN)/ruff check fraud_detection tests bench feature_repo docs

## The documentation site in _site/ (outside git): notebooks without saved outputs executed as nbdev_test runs them,
## nbdev's processors (show_doc, hidden cells, directives), rendered by Sphinx + myst-nb. Open _site/index.html.
## (With Quarto installed, `nbdev_docs` builds the standard nbdev site from nbs/_quarto.yml into _docs/ instead.)
docs: install
	$(BIN)/python docs/build.py site

## README.md from nbs/index.ipynb (nbdev_readme without Quarto).
readme: install
	$(BIN)/python docs/build.py readme

## Chromium for the browser tests, Prometheus (+ promtool) for the metrics and alert-rule tests, docker-compose to
## validate the compose file (no engine needed), Java 17+ for Spark (Debian packages; nothing downloaded by a test tool).
system-deps:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	@command -v promtool >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null)
	@command -v docker-compose >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null)
	@command -v java >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null) || true
	@java -version 2>&1 | grep -Eq 'version "(1[7-9]|[2-9][0-9])' || \
	  (echo "The Spark tests need Java 17 or newer: apt-get install openjdk-17-jre-headless (or put a JDK 17+ on PATH)" && exit 1)

lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[dev]"
	(echo "# Constraints for every install (pip install -c requirements.lock ...). Regenerate: make lock"; \
	  $(BIN)/python -m pip freeze --exclude-editable) > requirements.lock
