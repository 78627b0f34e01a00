# syntax=docker/dockerfile:1.7
# funnelcake-deploy-bot: the ChatOps bot's image. Build for linux/amd64, the platform of the GKE nodes:
#   docker build --platform linux/amd64 -t funnelcake-deploy-bot:$(git rev-parse --short HEAD) .
#
# Python packages come only from requirements.lock, every file checked against its sha256. After changing
# the dependencies in pyproject.toml, regenerate the lock (then rebuild):
#   uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
#     --python-platform x86_64-manylinux_2_36 --annotation-style line -o requirements.lock
# (x86_64-manylinux_2_36: the wheels that bookworm's glibc 2.36 on amd64 can load.)
#
# kubectl (the bot renders overlays with `kubectl kustomize`) and gke-gcloud-auth-plugin (the exec plugin
# of the Connect Gateway kube contexts) come from Google's cloud-sdk apt repository, both pinned to one
# gcloud release; bump GCLOUD_VERSION to move them together. Google's apt keyring is accepted only if it
# holds exactly the keys named by GOOGLE_APT_KEY_FINGERPRINTS (see the apt-key stage). Debian's own
# packages (git, ssh) are not pinned: bookworm replaces a version when it ships a security fix, so a pin
# would break the build for the wrong reason; the base image is what pins them, by digest.
#
# The images the bot deploys are never built here: in-cluster builds run kaniko (bot/adapters/build.py).
#
# Without Docker Hub or Google's apt repository (the development machines), `make image` builds this same
# file with buildah from a debootstrap bookworm, passing two build arguments the release leaves at their
# defaults:
#   --build-arg PYTHON_IMAGE=localhost/bookworm-base:<date>   a base without Python: the `python` stage
#                                                            installs Debian's python3.11 and python3-venv
#   --build-arg KUBE_TOOLS=context --build-context kube-tools=<dir>   kubectl (and gke-gcloud-auth-plugin,
#                                                            when <dir> has it) copied from <dir> instead of
#                                                            installed from Google's repository
# (buildah 1.28 picks the stages to build from the --build-arg values, not the ARG defaults: give it
# --build-arg KUBE_TOOLS=apt for a release build.)

# The base image. A release pins it by digest, passing the whole reference:
#   --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>
# To move to a newer base (Debian and Python security fixes), read the tag's current digest for the
# platform the image is built for, and use that:
#   skopeo inspect --override-os linux --override-arch amd64 --format '{{.Digest}}' \
#     docker://docker.io/library/python:3.11-slim-bookworm
# The default below names the tag only: this repository's CI cannot reach Docker Hub to read the digest,
# and a digest nobody has read from the registry must not stand here as if it were a pin.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Where kubectl and gke-gcloud-auth-plugin come from: `apt` (the release: Google's repository, pinned to
# GCLOUD_VERSION) or `context` (the build context named kube-tools; see above).
ARG KUBE_TOOLS=apt

# ---- Python: the base's own (python:3.11-slim), or Debian's python3.11 on a bare bookworm --------------
FROM ${PYTHON_IMAGE} AS python
RUN if command -v python3.11 >/dev/null 2>&1; then \
      echo "the base has $(python3.11 --version)"; \
    else \
      echo "the base has no python3.11: installing Debian's" \
      && apt-get update \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3.11 python3-venv \
      && rm -rf /var/lib/apt/lists/* \
      && ln -s /usr/bin/python3.11 /usr/local/bin/python \
      && python --version; \
    fi

# ---- Python dependencies, from the hashed lock, wheels only ---------------------------------------------
FROM python AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
COPY requirements.lock /tmp/requirements.lock
COPY pyproject.toml /tmp/pyproject.toml
# --only-binary: no compiler and no sdist build script runs; --no-deps: the lock is the complete set, so a
# dependency missing from it fails the build instead of being fetched unpinned.
# The secret pip-ca, when given, is the CA bundle pip trusts for the index: `make image` passes the host's,
# whose builder reaches PyPI through a TLS-intercepting proxy. It is mounted for this step only and no layer
# keeps it; without it (a release) pip trusts its own CAs.
RUN --mount=type=secret,id=pip-ca \
    python -m venv /opt/venv \
 && if [ -s /run/secrets/pip-ca ]; then cert="--cert /run/secrets/pip-ca"; else cert=""; fi \
 && /opt/venv/bin/pip install ${cert} --require-hashes --only-binary=:all: --no-deps -r /tmp/requirements.lock
# The bot runs from /app, not as an installed package, so the venv gets its metadata alone (name, version,
# dependencies from pyproject.toml): `funnelcake --version` reads the version from it, and `pip check` then
# verifies that the lock satisfies pyproject's dependency ranges, not only its own.
RUN /opt/venv/bin/python -c 'import pathlib, sysconfig, tomllib; \
p = tomllib.loads(pathlib.Path("/tmp/pyproject.toml").read_text())["project"]; \
d = pathlib.Path(sysconfig.get_paths()["purelib"], "funnelcake_deploy_bot-" + p["version"] + ".dist-info"); \
d.mkdir(); \
(d / "METADATA").write_text("Metadata-Version: 2.1\nName: " + p["name"] + "\nVersion: " + p["version"] + "\n" + "".join("Requires-Dist: " + r + "\n" for r in p["dependencies"])); \
(d / "INSTALLER").write_text("Dockerfile\n")' \
 && /opt/venv/bin/pip check

# ---- Google's apt signing key, fetched with tools the runtime image does not keep ---------------------
FROM ${PYTHON_IMAGE} AS apt-key
# The primary-key fingerprints (40 hex digits each, separated by spaces) that Google's apt keyring must
# hold, no more and no fewer: a key added to that file by whoever can change it would otherwise be trusted
# for every package. Take them from Google's own documentation or from a machine whose keyring you
# trust, never from the downloaded file alone; see them with
#   curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | gpg --show-keys
# When Google rotates its keys the build stops here with both lists; update the argument then.
ARG GOOGLE_APT_KEY_FINGERPRINTS=
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gnupg \
 && curl -fsSL --max-time 60 -o /tmp/apt-key.gpg https://packages.cloud.google.com/apt/doc/apt-key.gpg
RUN set -eu; \
    want="$(for f in ${GOOGLE_APT_KEY_FINGERPRINTS}; do echo "${f}"; done | tr 'a-f' 'A-F' | sort -u | tr '\n' ' ')"; \
    if [ -z "${want}" ]; then \
      echo "GOOGLE_APT_KEY_FINGERPRINTS is empty: pass the fingerprints of Google's apt keys (see the Dockerfile)" >&2; \
      exit 1; \
    fi; \
    got="$(gpg --batch --show-keys --with-colons /tmp/apt-key.gpg \
      | awk -F: '$1 == "pub" { primary = 1; next } $1 == "fpr" && primary { print $10; primary = 0 }' \
      | sort -u | tr '\n' ' ')"; \
    if [ "${got}" != "${want}" ]; then \
      echo "Google's apt keyring holds the keys [ ${got}] but GOOGLE_APT_KEY_FINGERPRINTS expects [ ${want}]: refusing it" >&2; \
      exit 1; \
    fi; \
    if grep -q -- '-----BEGIN PGP PUBLIC KEY BLOCK-----' /tmp/apt-key.gpg; then \
      gpg --batch --dearmor -o /cloud.google.gpg /tmp/apt-key.gpg; \
    else \
      cp /tmp/apt-key.gpg /cloud.google.gpg; \
    fi

# ---- kubectl and gke-gcloud-auth-plugin: from Google's repository (the release) ---------------------------
FROM python AS kube-tools-apt
ARG GCLOUD_VERSION=579.0.0
COPY --from=apt-key /cloud.google.gpg /usr/share/keyrings/cloud.google.gpg
# Google's kubectl carries epoch 1 ("1:<gcloud version>-0"); the auth plugin declares no Depends on the
# gcloud CLI, so neither drags in the whole SDK.
RUN echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt cloud-sdk main" \
      > /etc/apt/sources.list.d/google-cloud-sdk.list \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      "kubectl=1:${GCLOUD_VERSION}-0" \
      "google-cloud-cli-gke-gcloud-auth-plugin=${GCLOUD_VERSION}-0" \
 && rm -rf /var/lib/apt/lists/* \
 && kubectl version --client \
 && gke-gcloud-auth-plugin --version

# ---- kubectl and gke-gcloud-auth-plugin: from the build context kube-tools (make image) -----------------
FROM python AS kube-tools-context
COPY --from=kube-tools . /usr/local/bin/
RUN kubectl version --client \
 && if [ -x /usr/local/bin/gke-gcloud-auth-plugin ]; then \
      gke-gcloud-auth-plugin --version; \
    else \
      echo "WARNING: the kube-tools context has no gke-gcloud-auth-plugin: this image cannot use GKE contexts"; \
    fi

# ---- runtime -----------------------------------------------------------------------------------------------
FROM kube-tools-${KUBE_TOOLS} AS runtime
ARG UID=10001

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates \
      git \
      openssh-client \
      tini \
 && rm -rf /var/lib/apt/lists/* \
 && kubectl version --client \
 && git --version

# A fixed numeric UID/GID: Kubernetes' runAsNonRoot can only verify a numeric USER. The empty known_hosts
# is the mount point for the git remotes' host keys (deploy/ mounts them from the git Secret).
RUN groupadd --system --gid "${UID}" bot \
 && useradd --system --uid "${UID}" --gid bot --home-dir /home/bot --create-home --shell /usr/sbin/nologin bot \
 && install -m 0644 /dev/null /etc/ssh/ssh_known_hosts

COPY --from=deps /opt/venv /opt/venv
WORKDIR /app
COPY bot/ /app/bot/
COPY handlers/ /app/handlers/
COPY config/ /app/config/
# Bytecode is compiled now: the root filesystem is read-only at run time.
RUN python -m compileall -q /app/bot /app/handlers \
 && printf '#!/bin/sh\nexec python -m bot.cli "$@"\n' > /usr/local/bin/funnelcake \
 && chmod 0755 /usr/local/bin/funnelcake

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/bot \
    HTTP_PORT=3000 \
    FUNNELCAKE_CONFIG=/app/config/funnelcake.yaml \
    WORK_DIR=/var/lib/funnelcake/work \
    DATABASE_URL=sqlite+aiosqlite:////var/lib/funnelcake/funnelcake-bot.db \
    USE_GKE_GCLOUD_AUTH_PLUGIN=True

RUN mkdir -p /var/lib/funnelcake/work && chown -R "${UID}:${UID}" /var/lib/funnelcake
VOLUME ["/var/lib/funnelcake"]

USER ${UID}:${UID}
EXPOSE 3000

# /healthz answers while the event loop runs; the probe uses the venv's Python, as the image has no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:3000/healthz', timeout=4).status == 200 else 1)"]

# tini reaps git/ssh/kubectl children and forwards SIGTERM so the bot stops gracefully.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["python", "-m", "bot"]
