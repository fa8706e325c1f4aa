# Two targets for a newcomer on a fresh Debian machine: `make test` and `make demo`.
# Both set up what is missing (apt packages, .venv with the project editable) and are
# idempotent: a second run skips the installs.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
APT_PACKAGES := g++ pkg-config libopencv-dev libturbojpeg0-dev libgl1 slurm-wlm munge
PYTEST_ARGS ?=

.PHONY: setup test demo gpu-check clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo"; \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null) \
	  || { echo "error: could not install apt packages:$$missing (install them as root and rerun)"; exit 1; }; \
	fi
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[all]'
	@touch $(STAMP)

test: setup
	@status=0; \
	if bash slurm/cluster/up.sh; then export MVEB_SLURM_UP=1; else echo "warning: local SLURM cluster did not start; slurm tests will be skipped"; fi; \
	$(VENV)/bin/pytest $(PYTEST_ARGS) || status=$$?; \
	bash slurm/cluster/down.sh || true; \
	exit $$status

demo: setup
	$(VENV)/bin/mveb demo

# On a GPU host with torch installed: GPU tests and `mveb bench all --device cuda` into one folder.
# WHEELS=path/to/folder installs DALI and its dependencies from local wheels first.
gpu-check:
	bash tools/gpu_check.sh $(WHEELS)

clean-venv:
	rm -rf $(VENV)
