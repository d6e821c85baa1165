# Two commands: `make run` (set up, run on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test setup sample

$(BIN)/twistd: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' --config-settings editable_mode=compat
	touch $(BIN)/twistd

setup: $(BIN)/twistd

run: setup
	$(BIN)/twistd -n --pidfile= pydio-ws $(ARGS)

test: setup
	$(BIN)/python -m pytest

sample: setup
	$(BIN)/python -c "from pydio_ws.config import sample_ini; print(sample_ini(), end='')" > etc/pydio-ws.ini
