# The two commands: `make run` (set up, migrate, serve) and `make test` (set up, every test).
# Set-up is a local virtual environment in .venv with torch pinned exactly: on a machine with a
# local CPU wheel (this kind of CI box) pip takes it; on a GPU box pip takes the CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.stamp-install

.PHONY: install run test migrate clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[test]' "$(TORCH_SPEC)"
	touch $(STAMP)

install: $(STAMP)

migrate: install
	$(PY) -m streaming_llm migrate

run: migrate
	$(PY) -m streaming_llm serve

test: install
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
