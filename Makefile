# vgw: two commands do all set-up on a fresh Debian machine:
#   make demo   create the venv, install what is missing (mosquitto included), run the demo
#   make test   the same set-up, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv deps demo test test-slow lint bench install uninstall clean

all: test

# apt packages the project needs: mosquitto (the broker of the tests and the demo), and python3-venv
# where Debian splits it out.
deps:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then \
		echo "installing mosquitto (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto; \
	fi
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
		echo "installing python3-venv (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; \
	fi

$(BIN)/vgw: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/vgw

demo: deps venv
	$(BIN)/vgw demo

test: deps venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: deps venv
	$(BIN)/python -m pytest -q --runslow $(PYTEST_ARGS)

lint: venv
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/ruff check agent simulators dbc tests
	MYPY=$(BIN)/mypy .ci/typecheck

bench: deps venv
	$(BIN)/vgw bench

# Install the agent on this Debian / Raspberry Pi OS machine (venv under /opt/vgw, config under /etc/vgw,
# hardened unit, can0 network file, udev rule). DESTDIR=/dir stages the tree there instead.
# No dependency on `deps`: a car's Pi needs no broker.
install:
	@$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	@[ -x $(BIN)/vgw ] || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q -e .; }
	$(SUDO) $(BIN)/vgw install --prefix $(or $(DESTDIR),/)

uninstall:
	$(SUDO) $(BIN)/vgw uninstall --prefix $(or $(DESTDIR),/)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
