# Both targets do their own set-up on a fresh Debian machine: apt packages, a virtualenv, the package.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
APT_PACKAGES := docker-registry skopeo git
# Only `make image` needs these: `make test` does not install them.
IMAGE_APT_PACKAGES := buildah podman debootstrap uidmap runc
comma := ,
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=
# Most tests wait on local servers and subprocesses, so 4 workers fit 2 cores.
PYTEST_WORKERS ?= 4

.PHONY: test demo lint setup apt apt-image venv bench clean image image-base image-kube-tools image-test

test: setup lint
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check bot handlers tests bench
	$(VENV)/bin/ruff format --check bot handlers tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

demo: setup
	$(PY) -m tests.testbed.demo $(ARGS)

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

setup: apt $(VENV)/.installed

# $(call apt_install,<packages>): installs those of the Debian packages that are missing.
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
endef

apt:
	$(call apt_install,$(APT_PACKAGES))

apt-image:
	$(call apt_install,$(IMAGE_APT_PACKAGES))

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# ---- the container image, built here without Docker: buildah, on a debootstrap base ----------------------
# The Dockerfile's defaults are the release build (python:3.11-slim-bookworm by digest, kubectl and the GKE
# auth plugin from Google's apt repository). Here neither Docker Hub nor Google's repository answers, so
# `make image` passes a bookworm rootfs from Debian's mirror as the base and the host's kubectl and
# gke-gcloud-auth-plugin as the kube tools. Override IMAGE_BUILD_ARGS to build the release way.
IMAGE ?= localhost/funnelcake-deploy-bot:$(shell git describe --always --dirty 2>/dev/null || echo dev)
DEBIAN_MIRROR ?= http://deb.debian.org/debian
BASE_DATE ?= $(shell date -u +%Y%m%d)
BASE_RECIPE := 2
BOOKWORM_BASE ?= localhost/bookworm-base:$(BASE_DATE)-r$(BASE_RECIPE)
KUBE_TOOLS_DIR ?= .build/kube-tools
# runc, not Debian's default crun: crun refuses this machine's hybrid cgroup v1/v2 layout.
OCI_RUNTIME ?= runc
PODMAN_ARGS ?= --runtime $(OCI_RUNTIME)
# podman's default rlimits (nproc, nofile) are above what this machine lets a container set.
PODMAN_RUN_ARGS ?= --ulimit nofile=4096:4096 --ulimit nproc=4096:4096
# The host's CA bundle, as the build secret pip-ca (mounted for the pip step only): pip reaches PyPI through
# this machine's TLS-intercepting egress proxy, whose CA the base image does not trust. BUILD_CA= for none.
BUILD_CA ?= /etc/ssl/certs/ca-certificates.crt
IMAGE_BUILD_ARGS ?= --pull-never --build-arg PYTHON_IMAGE=$(BOOKWORM_BASE) --build-arg KUBE_TOOLS=context \
  --build-context kube-tools=$(KUBE_TOOLS_DIR) \
  $(if $(wildcard $(BUILD_CA)),--secret id=pip-ca$(comma)src=$(BUILD_CA))

image: apt-image image-base image-kube-tools
	$(SUDO) buildah bud --runtime $(OCI_RUNTIME) --format docker --layers --platform linux/amd64 $(IMAGE_BUILD_ARGS) -t $(IMAGE) .
	@echo "built $(IMAGE)"

# A minbase bookworm from Debian's mirror (.ci/bookworm-base.sh), one image a day: a second build on the
# same day reuses it (BASE_DATE=<yyyymmdd> picks another; bump BASE_RECIPE when the script changes).
image-base: apt-image
	@if $(SUDO) podman image exists $(BOOKWORM_BASE); then echo "$(BOOKWORM_BASE): cached, no debootstrap"; \
	else $(SUDO) .ci/bookworm-base.sh $(BOOKWORM_BASE) $(DEBIAN_MIRROR); fi

# kubectl and gke-gcloud-auth-plugin from the host, for --build-arg KUBE_TOOLS=context.
image-kube-tools:
	@set -eu; rm -rf $(KUBE_TOOLS_DIR); mkdir -p $(KUBE_TOOLS_DIR); \
	k=$$(command -v kubectl) || { echo "KUBE_TOOLS=context: no kubectl on this host's PATH" >&2; exit 1; }; \
	cp -L "$$k" $(KUBE_TOOLS_DIR)/kubectl; echo "kube tools: kubectl from $$(readlink -f $$k)"; \
	if p=$$(command -v gke-gcloud-auth-plugin); then \
	  cp -L "$$p" $(KUBE_TOOLS_DIR)/gke-gcloud-auth-plugin; \
	  echo "kube tools: gke-gcloud-auth-plugin from $$(readlink -f $$p)"; \
	else echo "kube tools: WARNING: this host has no gke-gcloud-auth-plugin, so the image will not have it"; fi

# Boots the image with podman and checks it as an operator would (tests/test_image.py).
image-test: image setup
	$(SUDO) env FUNNELCAKE_IMAGE=$(IMAGE) FUNNELCAKE_PODMAN_ARGS="$(PODMAN_ARGS)" \
	  FUNNELCAKE_KUBE_TOOLS_DIR=$(KUBE_TOOLS_DIR) FUNNELCAKE_PODMAN_RUN_ARGS="$(PODMAN_RUN_ARGS)" \
	  $(PY) -m pytest -p no:xdist -m image tests/test_image.py $(PYTEST_ARGS)
