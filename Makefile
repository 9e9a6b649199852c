# vgw: two commands do all set-up on a fresh Debian machine:
#   make demo   create the venv, install what is missing (mosquitto included), run the demo
#   make test   the same set-up, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# Tests run in parallel (pytest-xdist). Most of the suite waits on real time (brokers, agents, replays), so
# more workers than cores pays: 6 on a 2-core machine (4 min 25 s from a clean clone; 6 min 11 s with 4).
# PYTEST_WORKERS=0 runs in one process. --dist loadgroup keeps each xdist_group on one worker: "timing" (tests bound to
# wall-clock time, one at a time) and "nats-cluster" (one shared cluster); README "Layout" says more.
PYTEST_WORKERS ?= 6
PYTEST_DIST    := $(if $(filter 0,$(PYTEST_WORKERS)),,--dist loadgroup)
# Bytecode is kept (under build/, not beside the sources) even where PYTHONDONTWRITEBYTECODE is set: the suite
# starts `python -m vgw` some 800 times and every xdist worker imports every test module; compiling them all
# again each time cost more than a minute of CPU.
PYTEST_ENV     := env -u PYTHONDONTWRITEBYTECODE PYTHONPYCACHEPREFIX=$(CURDIR)/build/pycache
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv deps test-deps demo test test-slow explore lint docs bench bundle install uninstall clean

all: test

# apt packages the project needs: mosquitto (the broker of the tests and the demo), nats-server (the cluster
# tests), and python3-venv
# where Debian splits it out.
deps:
	@if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then \
		echo "installing mosquitto (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq mosquitto; \
	fi
	@if ! command -v nats-server >/dev/null 2>&1 && [ ! -x /usr/sbin/nats-server ]; then \
		echo "installing nats-server (apt-get): the NATS cluster tests"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq nats-server || \
		echo "nats-server not installed: the NATS tests will be skipped"; \
	fi
	@if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
		echo "installing python3-venv (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; \
	fi

# For the tests only: Debian's chromium renders the HTML privacy report headless (tests/test_report.py), and
# with chromium-driver Selenium drives it through the consent service's pages
# (tests/test_consent_service_browser.py); without them those tests are skipped and say why.
test-deps:
	@if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver (apt-get; the report rendering and browser tests)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium chromium-driver; \
	fi

$(BIN)/vgw: pyproject.toml | deps
	$(PYTHON) -m venv $(VENV)
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/vgw

demo: deps venv
	$(BIN)/vgw demo

test: deps test-deps venv
	$(PYTEST_ENV) $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_DIST) $(PYTEST_ARGS)

test-slow: deps test-deps venv
	$(PYTEST_ENV) $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_DIST) --runslow $(PYTEST_ARGS)

# The fault-schedule explorer (docs/guarantees.md, "The fault-schedule explorer"): N seeded schedules of faults
# against the real agent on J workers (each with its own two brokers), failing ones shrunk to a minimal step
# list; SEED=n runs that one schedule again. One JSON line per schedule goes to build/explore-results.jsonl.
N     ?= 200
J     ?= 1
FIRST ?= 1
explore: deps venv
	$(BIN)/python -m tests.explore $(if $(SEED),--seed $(SEED),-n $(N) -j $(J) --first $(FIRST))

# ruff, mypy strict over the whole `vgw` package, and the layer contract (README "Layout", tests/test_layers.py)
lint: venv
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/ruff check agent simulators dbc tests
	MYPY=$(BIN)/mypy .ci/typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_layers.py

# The documentation site (mkdocs.yml, sources in docs/) into site/, with --strict: a broken link, anchor or API
# reference (mkdocstrings, from the docstrings of vgw.api) fails the build. build/docs/vgw links to agent/,
# because griffe cannot follow the `vgw` -> agent/ mapping of pyproject's package-dir.
docs: venv
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install -q -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The headline of docs/performance.md: `vgw run` as a whole process against the naive process, on the demo vehicle
# and on a real DBC with many messages (comma.ai's opendbc mazda_3_2019.dbc, 59 messages: fetched with pip into the
# test corpus cache of tests/decoderkit.py, never committed), 400k frames, 3 alternating rounds; then the stages
# with every signal of that DBC. BENCH_DBC=FILE benches another DBC; BENCH_ARGS=--json etc. adds options.
BENCH_DBC ?= $(shell $(BIN)/python -c 'from tests.decoderkit import fetch_sdist_files as f; \
	d = f("opendbc==0.3.1", lambda n: n.endswith(".dbc") and "/opendbc/dbc/" in n); \
	print(d / "mazda_3_2019.dbc" if d else "")' 2>/dev/null)
BENCH_ARGS ?= --frames 400000 --rounds 3
bench: deps venv
	$(BIN)/vgw bench $(if $(BENCH_DBC),--dbc $(BENCH_DBC) --consent all,) $(BENCH_ARGS)

# The offline install bundle for a car without internet: dist/vgw-bundle-<version>-<arch>.tar.gz with every
# wheel for the target and install.sh (docs/install-raspberry-pi.md, "Offline install").
# ARCH=aarch64 (Pi OS 64-bit, default), armv7l (32-bit) or host (this machine).
ARCH    ?= aarch64
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
bundle: venv
	$(BIN)/python packaging/bundle.py --arch $(ARCH)

# Install the agent on this Debian / Raspberry Pi OS machine (venv under /opt/vgw, config under /etc/vgw,
# hardened unit, can0 network file, udev rule). DESTDIR=/dir stages the tree there instead, through the
# offline bundle, so that the staged tree names /opt/vgw (not DESTDIR) and can be copied onto a device.
# No dependency on `deps`: a car's Pi needs no broker.
# With DESTDIR, install.sh picks an interpreter the agent's user can run unless PYTHON is given.
install:
	@$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq python3-venv; }
	@[ -x $(BIN)/vgw ] || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install -q -e .; }
ifdef DESTDIR
	$(BIN)/python packaging/bundle.py --arch host
	rm -rf build/bundle && mkdir -p build/bundle
	tar xzf dist/vgw-bundle-$(VERSION)-$$(uname -m).tar.gz -C build/bundle
	build/bundle/vgw-bundle-$(VERSION)-$$(uname -m)/install.sh --root $(DESTDIR) \
	    $(if $(filter command line environment,$(origin PYTHON)),--python $(PYTHON))
else
	$(SUDO) $(BIN)/vgw install --prefix /
endif

uninstall:
	$(SUDO) $(BIN)/vgw uninstall --prefix $(or $(DESTDIR),/)

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .mypy_cache .ruff_cache
