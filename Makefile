# Two commands: `make run` (set up, run on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test setup docs

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

# Regenerate what is derived from the configuration key table.
docs: setup
	$(BIN)/python -c "from pydio_ws.config import sample_ini; print(sample_ini(), end='')" > etc/pydio-ws.ini
	$(BIN)/python -c "import pathlib; from pydio_ws.config import reference_table, TABLE_START, TABLE_END; \
	readme = pathlib.Path('README.md'); text = readme.read_text(); \
	start, end = text.index(TABLE_START), text.index(TABLE_END) + len(TABLE_END); \
	readme.write_text(text[:start] + reference_table() + text[end:])"
