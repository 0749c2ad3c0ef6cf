# twistmail: the two commands that matter are `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= etc/twistmail.toml

.PHONY: install run test bench lint clean

$(STAMP): pyproject.toml setup.cfg
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	# Write Twisted's plugin cache now, as the installing user, so an
	# unprivileged daemon never tries to.
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	# Byte-compile our own modules: every prestart job imports them at start,
	# and an environment with PYTHONDONTWRITEBYTECODE would recompile each time.
	$(PY) -m compileall -q twistmail
	touch $(STAMP)

install: $(STAMP)

# No pid file: the appliance locks its state directory itself, and a pid file
# left by a killed daemon, whose pid another process has since, blocks a start.
# twistd ends by the signal it stopped on (SIGTERM, SIGINT): a controlled stop.
run: $(STAMP)
	$(VENV)/bin/twistd -n --pidfile= twistmail --config $(CONFIG) || \
	  { rc=$$?; [ $$rc -eq 143 ] || [ $$rc -eq 130 ] || exit $$rc; }

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/handoff
	$(PY) bench/smtp-accept
	$(PY) bench/pop-retr
	$(PY) bench/relay
	$(PY) bench/backlog

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache
