# Two entry points: `make demo` (the main job on the default model) and `make test`.
# Both create .venv with torch==2.13.0 (CPU) and potq in editable mode on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install clean

$(BIN)/potq: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/potq

install: $(BIN)/potq

demo: install
	$(BIN)/potq demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) out
