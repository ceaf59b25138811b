# Chorus: `make run` starts the server, `make test` runs the whole suite. Both install what they need.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
APT_STAMP := .apt-installed
SYSTEM_PACKAGES := chromium coturn redis-server docker-compose iproute2
# Streaming tools for the ingest and egress tests, without their recommended packages.
MEDIA_PACKAGES := ffmpeg srt-tools libsrt1.5-gnutls

.PHONY: run run-cluster test install system-deps lint clean fuzz soak bench bench-deps

# The package folders are prerequisites: a file added to or removed from one changes the folder, and the
# strict editable install (links to each file, see pyproject.toml) must then be made again.
PACKAGE_DIRS := sfu/ signaling/ turn/ web/ web/vendor/hls.js/ bench/ bench/native/ egress/ ingest/
$(STAMP): pyproject.toml $(PACKAGE_DIRS)
	@# Debian's own python3 needs python3-venv for this; install it when missing.
	python3 -m venv $(VENV) || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv && \
	  python3 -m venv $(VENV); }
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,dev]' --config-settings editable_mode=strict
	touch $(STAMP)

install: $(STAMP)

# System packages (Debian): Chromium for browser tests, coturn for TURN tests, redis-server for cluster tests,
# docker-compose to validate docker-compose.yml (no engine runs), iproute2 for test network namespaces, and the
# streaming tools. Skipped when already present.
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	media=""; for p in $(MEDIA_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || media="$$media $$p"; done; \
	if [ -n "$$missing$$media" ]; then \
	  echo "installing system packages:$$missing$$media"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq; \
	  if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; fi; \
	  if [ -n "$$media" ]; then \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$media; fi; \
	fi

# RTMP ingest on 1935 (docs/ingest.md): `chorus ingress create --room demo --name obs --kind rtmp` prints the URL.
run: install
	$(VENV)/bin/chorus serve --dev --host 127.0.0.1 --port 8080 --rtmp-port 1935

# Two nodes and a redis-server on this machine (http://127.0.0.1:8080 and :8081).
run-cluster: install system-deps
	scripts/run-cluster

# Caddy, for `caddy validate` of the HTTPS deployment (tests/test_deploy.py). Debian's caddy package starts a
# caddy service on port 80 when installed: only its binary is taken out of the package, into .tools/.
CADDY := .tools/caddy/usr/bin/caddy
$(CADDY):
	mkdir -p .tools
	cd .tools && rm -f caddy_*.deb && { apt-get download caddy 2>/dev/null || \
	  { apt-get update -qq && apt-get download caddy; }; } && dpkg-deb -x caddy_*.deb caddy && rm -f caddy_*.deb
	touch $(CADDY)

test: install system-deps bench-deps $(CADDY)
	@# -P: the repository root is not on sys.path, so the tests import the installed chorus package.
	$(PY) -P -m pytest -ra $(PYTEST_ARGS)

# Fuzz every untrusted-input entry point for FUZZ_SECONDS (default 300) each; failures land in tests/fuzz_corpus.
fuzz: install
	$(PY) tests/fuzz.py

# The long runs: 1000 join/publish/leave cycles (objects, tasks, fds back to baseline, RSS within 10 %), then a
# steady three-person call of Chromium pages for SOAK_MINUTES (default 60) reporting RSS and frame rates each
# minute (RSS at the end within 5 % of minute 10).
SOAK_MINUTES ?= 60
soak: install system-deps
	CHORUS_CHURN_CYCLES=1000 $(PY) -P -m pytest -s -o timeout=1800 tests/test_churn.py
	CHORUS_SOAK_MINUTES=$(SOAK_MINUTES) $(PY) -P -m pytest -s -o timeout=$$(( $(SOAK_MINUTES) * 60 + 600 )) \
	  tests/test_soak_call.py

# Chorus against Janus (and aiortc's MediaRelay) under the same load, side by side, then a Chromium publisher's
# ramp-up into each (~10 minutes); then what ingest (RTMP → browser glass-to-glass, CPU per ingested stream) and
# HTTP egress (passthrough HLS, ladder rungs) cost (~4 minutes). BENCH_ARGS go to the first.
# gcc builds a tiny preload library that makes Janus gather candidates on loopback only.
BENCH_PACKAGES := janus gcc libc6-dev
bench-deps:
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing system packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; fi

bench: install bench-deps system-deps
	$(PY) -m chorus.bench $(BENCH_ARGS)
	$(PY) -m chorus.bench.ingest
	$(PY) -m chorus.bench.egress_cost

# ruff over everything, mypy --strict on the server packages, the import contracts of pyproject.toml.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .tools
