# pingated — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
GATE_PORT ?= 3060
UPSTREAM_PORT ?= 3050
# Debian packages the test suite drives for real (see tests/README.md).
SYSTEM_PACKAGES ?= nginx chromium chromium-driver fonts-dejavu-core caddy pebble systemd dpkg-dev debhelper fakeroot lintian adduser python3.11-venv ca-certificates fail2ban

.PHONY: run test install install-test system-deps lint typecheck unit bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel

# Dependencies are (re)installed when the packaging files change ...
$(VENV)/.deps: setup.cfg pyproject.toml | $(PY)
	$(PIP) install -q .
	touch $@

$(VENV)/.deps-test: setup.cfg pyproject.toml | $(PY)
	$(PIP) install -q '.[test]'
	touch $@

# ... and the project itself on every run: a normal (non-editable) install is
# what twistd's plugin scan sees, then the plugin cache is regenerated.
install: $(VENV)/.deps
	$(PIP) install -q --no-deps --no-build-isolation --force-reinstall .
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

install-test: $(VENV)/.deps-test install

system-deps:
	@scripts/ensure-system-packages $(SYSTEM_PACKAGES)

run: install
	@scripts/run-demo $(GATE_PORT) $(UPSTREAM_PORT)

lint: install-test
	$(VENV)/bin/ruff check pingated twisted tests bench

typecheck: install-test
	$(VENV)/bin/mypy

test: install-test system-deps lint typecheck
	$(PY) -m pytest

bench: install-test
	@SYSTEM_PACKAGES="nginx wrk" scripts/ensure-system-packages nginx wrk
	$(PY) bench/run.py --out docs/benchmarks.md

clean:
	rm -rf $(VENV) build *.egg-info run test-artifacts
