# thinblock: two commands set up a fresh machine from nothing.
#   make serve   -- install everything, then start the daemon on ./thinblock-data
#   make test    -- install everything, then lint, type-check and run the whole test suite
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
APT_PKGS := qemu-utils libnbd-bin fio nbdkit openssl libiscsi-bin qemu-block-extra tgt chromium postgresql iproute2 zsh fish

.PHONY: setup deps venv serve test lint typecheck pytest bench drills clean

setup: deps venv

# Debian packages the tests and benchmarks drive (real NBD clients and peers).
deps:
	@missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

serve: setup
	$(BIN)/thinblock serve

lint: venv
	$(BIN)/ruff check --no-cache src tests bench
	$(BIN)/ruff format --no-cache --check src tests bench

typecheck: venv
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest -q -n 2 --dist loadgroup

test: lint typecheck pytest

bench: setup
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.iscsi --output bench/results/iscsi-latest.md
	$(BIN)/python -m bench.node_pair
	$(BIN)/python -m bench.metadata_backends
	$(BIN)/python -m bench.snapshots

drills: setup
	$(BIN)/pytest -q -m long tests/drills

clean:
	rm -rf $(VENV) thinblock-data .pytest_cache .mypy_cache .ruff_cache
