"""Test-bed git remotes: a deterministic funnelcake app repo and a GitOps repo, as bare repos on disk.

Usable outside pytest (`GitRemotes(root).setup()`, or `async with GitRemotes(root)`); the pytest
fixtures `app_remote` and `gitops_remote` wrap it. Every commit is written with fixed identities and
dates, so the shas are the same on every machine and every run.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType

import pytest

from bot.settings import DEFAULT_CONFIG_PATH, FunnelcakeConfig, OverlayRepo, Repo, Repos, load_config

GIT_TIMEOUT = 30.0
BRANCH = "main"
ENVS = ("production", "staging", "poc")
SERVICES = ("api", "relay")

# Fake hosts: enough for `kubectl kustomize`; a composition with real registries passes its own prefixes.
DEFAULT_REGISTRIES: dict[str, str] = {
    "production": "registry.production.test/dv-platform-prod/containers-production",
    "staging": "registry.staging.test/dv-platform-staging/containers-staging",
    "poc": "registry.poc.test/rich-compiler-479518-d2/containers-poc",
}
# Which app-repo commit each env is deployed at by default: production ahead of staging ahead of poc.
DEFAULT_DEPLOYED: dict[str, str] = {"production": "relay-tune", "staging": "add-index", "poc": "api-paginate"}

_EPOCH = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
_ADA = ("Ada Okafor", "ada@divine.video")
_BEN = ("Ben Marsh", "ben@divine.video")
_CHLOE = ("Chloe Varga", "chloe@divine.video")
_TESTBED = ("funnelcake test bed", "testbed@divine.video")
_MIGRATIONS = "database/migrations"
FAILS_HALFWAY_MARKER = "-- testbed: fails-halfway"


def _base_env() -> dict[str, str]:
    """An environment that ignores the user's and the system's git config, so output never varies."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": tempfile.gettempdir(),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "LC_ALL": "C",
        "TZ": "UTC",
    }


def _identity_env(who: tuple[str, str], when: datetime) -> dict[str, str]:
    stamp = when.isoformat()
    return {
        "GIT_AUTHOR_NAME": who[0],
        "GIT_AUTHOR_EMAIL": who[1],
        "GIT_AUTHOR_DATE": stamp,
        "GIT_COMMITTER_NAME": who[0],
        "GIT_COMMITTER_EMAIL": who[1],
        "GIT_COMMITTER_DATE": stamp,
    }


def git(
    cwd: Path, *args: str, env: dict[str, str] | None = None, input_: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """Run git with the isolated environment; raise with git's own stderr when it fails."""
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**_base_env(), **(env or {})},
        input=input_,
        capture_output=True,
        timeout=GIT_TIMEOUT,
        check=False,
    )
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def git_out(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return git(cwd, *args, env=env).stdout.decode().strip()


def file_url(path: Path) -> str:
    return path.resolve().as_uri()


# ---------------------------------------------------------------------------------------------------
# app repo


@dataclass(frozen=True)
class AppRemote:
    path: Path
    commits: dict[str, str]
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return file_url(self.path)

    def short(self, label: str) -> str:
        return self.commits[label][:7]


_DOCKERFILE = """\
# syntax=docker/dockerfile:1.7
# One Dockerfile, two images: `docker build --target api` and `docker build --target relay`.
# GKE nodes are linux/amd64: build with --platform linux/amd64 (an arm64 image will not pull).

FROM golang:1.23-bookworm AS api-build
WORKDIR /src/api
COPY api/go.mod ./
RUN go mod download
COPY api/ ./
RUN CGO_ENABLED=0 go build -trimpath -o /out/funnelcake-api ./...

FROM rust:1.82-bookworm AS relay-build
WORKDIR /src/relay
COPY relay/ ./
RUN cargo build --release --locked && cp target/release/funnelcake-relay /out-relay

FROM gcr.io/distroless/static-debian12:nonroot AS api
COPY --from=api-build /out/funnelcake-api /usr/local/bin/funnelcake-api
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/funnelcake-api"]

FROM gcr.io/distroless/cc-debian12:nonroot AS relay
COPY --from=relay-build /out-relay /usr/local/bin/funnelcake-relay
EXPOSE 7777
ENTRYPOINT ["/usr/local/bin/funnelcake-relay"]
"""

_DB_DOCKERFILE = """\
# funnelcake-migrate: golang-migrate against ClickHouse, driven by entrypoint.sh.
FROM migrate/migrate:v4.18.1
COPY migrations/ /migrations/
COPY entrypoint.sh /entrypoint.sh
ENTRYPOINT ["/entrypoint.sh"]
CMD ["up"]
"""

_ENTRYPOINT = """\
#!/bin/sh
# Two modes, chosen by the environment:
#  - cloud (ClickHouse Cloud): CLICKHOUSE_URL is set; port 9440 with TLS is forced.
#  - self-hosted: CLICKHOUSE_HOST + CLICKHOUSE_PORT (9000), no TLS.
set -eu
: "${CLICKHOUSE_USER:?}" "${CLICKHOUSE_PASSWORD:?}" "${CLICKHOUSE_DATABASE:?}"
if [ -n "${CLICKHOUSE_URL:-}" ]; then
  host="${CLICKHOUSE_URL#*://}"; host="${host%%:*}"; host="${host%%/*}"
  dsn="clickhouse://${host}:9440?username=${CLICKHOUSE_USER}&password=${CLICKHOUSE_PASSWORD}&database=${CLICKHOUSE_DATABASE}&secure=true&x-multi-statement=true"
else
  : "${CLICKHOUSE_HOST:?}" "${CLICKHOUSE_PORT:?}"
  dsn="clickhouse://${CLICKHOUSE_HOST}:${CLICKHOUSE_PORT}?username=${CLICKHOUSE_USER}&password=${CLICKHOUSE_PASSWORD}&database=${CLICKHOUSE_DATABASE}&x-multi-statement=true"
fi
exec migrate -path /migrations -database "$dsn" "$@"
"""

_README = """\
# divine-funnelcake

A Nostr relay (`relay/`, Rust) and its read API (`api/`, Go), on ClickHouse.
Migrations live in `database/migrations/` (golang-migrate naming: NNNNNN_name.up.sql / .down.sql).
"""

_GO_MOD = "module github.com/divinevideo/divine-funnelcake/api\n\ngo 1.23\n"

_API_MAIN_V1 = """\
package main

import (
\t"log"
\t"net/http"
)

func main() {
\thttp.HandleFunc("/events", listEvents)
\tlog.Fatal(http.ListenAndServe(":8080", nil))
}

func listEvents(w http.ResponseWriter, r *http.Request) {
\tw.Header().Set("Content-Type", "application/json")
\t_, _ = w.Write([]byte(`{"events":[]}`))
}
"""

_API_MAIN_V2 = _API_MAIN_V1.replace(
    '\t_, _ = w.Write([]byte(`{"events":[]}`))\n',
    '\tlimit := r.URL.Query().Get("limit")\n'
    '\tif limit == "" {\n\t\tlimit = "100"\n\t}\n'
    '\t_, _ = w.Write([]byte(`{"events":[],"limit":` + limit + `,"next":null}`))\n',
)

_API_MAIN_V3 = _API_MAIN_V2.replace(
    '\thttp.HandleFunc("/events", listEvents)\n',
    '\thttp.HandleFunc("/events", listEvents)\n'
    '\thttp.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {\n'
    '\t\t_, _ = w.Write([]byte("ok"))\n\t})\n',
)

_CARGO = """\
[package]
name = "funnelcake-relay"
version = "1.3.0"
edition = "2021"

[dependencies]
"""

_RELAY_MAIN = """\
mod config;

fn main() {
    let cfg = config::Config::from_env();
    println!("funnelcake-relay listening on {}", cfg.listen);
}
"""

_RELAY_CONFIG_V1 = """\
pub struct Config {
    pub listen: String,
    pub max_subscriptions: usize,
}

impl Config {
    pub fn from_env() -> Self {
        Config {
            listen: std::env::var("LISTEN").unwrap_or_else(|_| "0.0.0.0:7777".into()),
            max_subscriptions: 20,
        }
    }
}
"""

_RELAY_CONFIG_V2 = (
    _RELAY_CONFIG_V1.replace("max_subscriptions: 20,", "max_subscriptions: 64,")
    .replace(
        "    pub max_subscriptions: usize,\n",
        "    pub max_subscriptions: usize,\n    pub write_batch: usize,\n",
    )
    .replace(
        "            max_subscriptions: 64,\n",
        "            max_subscriptions: 64,\n            write_batch: 512,\n",
    )
)

_MIGRATIONS_FILES: dict[str, tuple[str, str]] = {
    "000001_create_events": (
        "CREATE TABLE IF NOT EXISTS events\n(\n    id String,\n    pubkey String,\n    created_at DateTime,\n"
        "    kind UInt32,\n    content String,\n    sig String\n)\nENGINE = ReplacingMergeTree\nORDER BY (kind, created_at, id);\n",
        "DROP TABLE IF EXISTS events;\n",
    ),
    "000002_create_tags": (
        "CREATE TABLE IF NOT EXISTS tags\n(\n    event_id String,\n    name LowCardinality(String),\n    value String\n)\n"
        "ENGINE = MergeTree\nORDER BY (name, value, event_id);\n",
        "DROP TABLE IF EXISTS tags;\n",
    ),
    "000003_add_index": (
        "ALTER TABLE events ADD INDEX IF NOT EXISTS idx_pubkey pubkey TYPE bloom_filter GRANULARITY 4;\n",
        "ALTER TABLE events DROP INDEX IF EXISTS idx_pubkey;\n",
    ),
    "000004_backfill_counts": (
        "CREATE TABLE IF NOT EXISTS event_counts\n(\n    pubkey String,\n    n UInt64\n)\nENGINE = SummingMergeTree\nORDER BY pubkey;\n"
        "-- testbed: fails-halfway\n"  # == FAILS_HALFWAY_MARKER; the fake ClickHouse stops here
        "INSERT INTO event_counts SELECT pubkey, count() FROM events GROUP BY pubkey;\n",
        "DROP TABLE IF EXISTS event_counts;\n",
    ),
}


def _migration_files(*names: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in names:
        up, down = _MIGRATIONS_FILES[name]
        out[f"{_MIGRATIONS}/{name}.up.sql"] = up
        out[f"{_MIGRATIONS}/{name}.down.sql"] = down
    return out


class _Seeder:
    """Writes files into a scratch work tree and commits them with a fixed author and date."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.tick = 0
        git(work, "init", "-q", "-b", BRANCH, ".")

    def next_time(self) -> datetime:
        self.tick += 1
        return _EPOCH + timedelta(hours=3 * self.tick)

    def write(self, files: dict[str, str | bytes], executable: tuple[str, ...] = ()) -> None:
        for rel, content in files.items():
            p = self.work / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content.encode() if isinstance(content, str) else content)
            p.chmod(0o755 if rel in executable else 0o644)

    def commit(self, who: tuple[str, str], message: str) -> str:
        git(self.work, "add", "-A")
        git(self.work, "commit", "-q", "--no-verify", "-m", message, env=_identity_env(who, self.next_time()))
        return git_out(self.work, "rev-parse", "HEAD")

    def publish(self, bare: Path) -> None:
        git(bare.parent, "init", "-q", "--bare", "-b", BRANCH, str(bare))
        git(self.work, "push", "-q", str(bare), "refs/heads/*:refs/heads/*", "refs/tags/*:refs/tags/*")


def _commit_object(tree: str, parent: str, who: tuple[str, str], when: datetime, message: str) -> bytes:
    ident = f"{who[0]} <{who[1]}> {int(when.timestamp())} +0000"
    return f"tree {tree}\nparent {parent}\nauthor {ident}\ncommitter {ident}\n\n{message}".encode()


def _object_sha(body: bytes) -> str:
    return hashlib.sha1(b"commit %d\0" % len(body) + body, usedforsecurity=False).hexdigest()


def find_short_collision(
    make_a: Callable[[int], bytes], make_b: Callable[[int], bytes], width: int = 7, limit: int = 1 << 22
) -> tuple[int, int]:
    """Birthday search: nonces (i, j) whose commit objects share the first `width` hex chars.

    Deterministic: nonces are tried in order, so the same inputs always give the same pair.
    """
    seen_a: dict[str, int] = {}
    seen_b: dict[str, int] = {}
    for n in range(limit):
        pa = _object_sha(make_a(n))[:width]
        if pa in seen_b:
            return n, seen_b[pa]
        seen_a.setdefault(pa, n)
        pb = _object_sha(make_b(n))[:width]
        if pb in seen_a:
            return seen_a[pb], n
        seen_b.setdefault(pb, n)
    raise RuntimeError("no short-sha collision found")  # pragma: no cover - 2^22 tries is far past 2^14


def seed_app_repo(root: Path) -> AppRemote:
    """Create `root/divine-funnelcake.git` (bare) with the commits described in the module docstring."""
    root.mkdir(parents=True, exist_ok=True)
    bare = root / "divine-funnelcake.git"
    work = Path(tempfile.mkdtemp(prefix="seed-app-", dir=root))
    try:
        s = _Seeder(work)
        commits: dict[str, str] = {}
        s.write(
            {
                "README.md": _README,
                "Dockerfile": _DOCKERFILE,
                "database/Dockerfile": _DB_DOCKERFILE,
                "database/entrypoint.sh": _ENTRYPOINT,
                "api/go.mod": _GO_MOD,
                "api/main.go": _API_MAIN_V1,
                "relay/Cargo.toml": _CARGO,
                "relay/src/main.rs": _RELAY_MAIN,
                "relay/src/config.rs": _RELAY_CONFIG_V1,
                **_migration_files("000001_create_events", "000002_create_tags"),
            },
            executable=("database/entrypoint.sh",),
        )
        commits["initial"] = s.commit(_ADA, "funnelcake: relay and api on ClickHouse\n")
        s.write({"api/main.go": _API_MAIN_V2})
        commits["api-paginate"] = s.commit(_BEN, "api: paginate /events with limit\n")
        s.write(_migration_files("000003_add_index"))
        commits["add-index"] = s.commit(_ADA, "db: bloom-filter index on events.pubkey\n")
        s.write({"relay/src/config.rs": _RELAY_CONFIG_V2})
        commits["relay-tune"] = s.commit(_CHLOE, "relay: raise subscription limit, batch writes\n")
        git(
            work,
            "tag",
            "-a",
            "v1.4.0",
            "-m",
            "funnelcake 1.4.0\n",
            commits["relay-tune"],
            env=_identity_env(_CHLOE, s.next_time()),
        )
        s.write({"api/main.go": _API_MAIN_V3})
        commits["head"] = s.commit(_BEN, "api: add /healthz for the load balancer\n")

        git(work, "checkout", "-q", "-b", "broken-migration", commits["head"])
        s.write(_migration_files("000004_backfill_counts"))
        commits["broken"] = s.commit(_ADA, "db: backfill per-author event counts\n")

        _seed_collision(s, commits)
        git(work, "checkout", "-q", BRANCH)
        s.publish(bare)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return AppRemote(path=bare, commits=commits, tags={"v1.4.0": commits["relay-tune"]})


def _seed_collision(s: _Seeder, commits: dict[str, str]) -> None:
    """Branch `collision` off the first commit: two sibling commits whose 7-char shas are equal, then a merge."""
    work = s.work
    git(work, "checkout", "-q", "-b", "collision", commits["initial"])
    s.write({"docs/notes-a.md": "Relay tuning notes, take A.\n"})
    git(work, "add", "-A")
    tree_a = git_out(work, "write-tree")
    (work / "docs/notes-a.md").unlink()
    s.write({"docs/notes-b.md": "Relay tuning notes, take B.\n"})
    git(work, "add", "-A")
    tree_b = git_out(work, "write-tree")
    s.write({"docs/notes-a.md": "Relay tuning notes, take A.\n"})
    git(work, "add", "-A")
    tree_merge = git_out(work, "write-tree")

    when_a, when_b = s.next_time(), s.next_time()

    def make_a(n: int) -> bytes:
        msg = f"docs: relay tuning notes (A)\n\nExperiment-Nonce: {n}\n"
        return _commit_object(tree_a, commits["initial"], _CHLOE, when_a, msg)

    def make_b(n: int) -> bytes:
        msg = f"docs: relay tuning notes (B)\n\nExperiment-Nonce: {n}\n"
        return _commit_object(tree_b, commits["initial"], _BEN, when_b, msg)

    ia, ib = find_short_collision(make_a, make_b)
    for label, body in (("collision-a", make_a(ia)), ("collision-b", make_b(ib))):
        sha = git(work, "hash-object", "-t", "commit", "-w", "--stdin", input_=body).stdout.decode().strip()
        if sha != _object_sha(body):  # pragma: no cover - guards the hand-written object format
            raise RuntimeError(f"git wrote {sha}, expected {_object_sha(body)}")
        commits[label] = sha
    merge = git_out(
        work,
        "commit-tree",
        tree_merge,
        "-p",
        commits["collision-a"],
        "-p",
        commits["collision-b"],
        "-m",
        "Merge both takes of the relay notes",
        env=_identity_env(_CHLOE, s.next_time()),
    )
    git(work, "update-ref", "refs/heads/collision", merge)
    git(work, "reset", "-q", "--hard", merge)


# ---------------------------------------------------------------------------------------------------
# GitOps repo


@dataclass(frozen=True)
class GitOpsRemote:
    path: Path
    registries: dict[str, str]
    tags: dict[str, str]
    branch: str = BRANCH

    @property
    def url(self) -> str:
        return file_url(self.path)

    @staticmethod
    def overlay(service: str, env: str) -> str:
        return f"k8s/applications/funnelcake-{service}/overlays/{env}/kustomization.yaml"


def overlay_path(service: str, env: str) -> str:
    return GitOpsRemote.overlay(service, env)


def _base_kustomization(service: str) -> str:
    return f"""\
# funnelcake-{service}: shared manifests; each environment's overlay pins the image.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: funnelcake
resources:
  - deployment.yaml
"""


def _base_deployment(service: str) -> str:
    port = 8080 if service == "api" else 7777
    sidecar = (
        """\
        - name: metrics
          image: prom/statsd-exporter:v0.26.0
          ports:
            - name: metrics
              containerPort: 9102
"""
        if service == "relay"
        else ""
    )
    return f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: funnelcake-{service}
  namespace: funnelcake
  labels:
    app.kubernetes.io/name: funnelcake-{service}
    app.kubernetes.io/part-of: funnelcake
spec:
  replicas: 2
  selector:
    matchLabels:
      app.kubernetes.io/name: funnelcake-{service}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: funnelcake-{service}
        app.kubernetes.io/part-of: funnelcake
    spec:
      containers:
        - name: {service}
          image: funnelcake-{service}
          ports:
            - name: http
              containerPort: {port}
          envFrom:
            - secretRef:
                name: funnelcake-clickhouse-credentials
          readinessProbe:
            tcpSocket:
              port: http
{sidecar}"""


def _overlays(registries: dict[str, str], tags: dict[str, str]) -> dict[str, str | bytes]:
    """The six overlays, each in a different style a person might have written by hand."""
    r, t = registries, tags
    files: dict[str, str | bytes] = {}
    files[overlay_path("api", "production")] = f"""\
# funnelcake-api — production (ClickHouse Cloud).
# newTag is the 7-char commit of divine-funnelcake; funnelcake-deploy-bot bumps it.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization

resources:
  - ../../base

namespace: funnelcake

images:
  - name: funnelcake-api
    newName: {r["production"]}/funnelcake-api
    newTag: "{t["production"]}"
"""
    files[overlay_path("api", "staging")] = f"""\
---
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../base
namespace: funnelcake
images:
  - name: funnelcake-api
    newName: {r["staging"]}/funnelcake-api
    newTag: '{t["staging"]}'  # bumped by funnelcake-deploy-bot, do not edit by hand
"""
    files[overlay_path("api", "poc")] = f"""\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: funnelcake
resources:
- ../../base
images:
# poc tracks whatever is being tried out
- newTag: {t["poc"]}
  name: funnelcake-api
  newName: {r["poc"]}/funnelcake-api
"""
    files[overlay_path("relay", "production")] = f"""\
# funnelcake-relay — production
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources: [../../base]
namespace: funnelcake
images: [{{name: funnelcake-relay, newName: {r["production"]}/funnelcake-relay, newTag: "{t["production"]}"}}]
"""
    files[overlay_path("relay", "staging")] = f"""\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../base
namespace: funnelcake
images:
  # metrics sidecar, pinned on its own schedule
  - name: prom/statsd-exporter
    newTag: "v0.26.1"
  - name: funnelcake-relay
    newName: {r["staging"]}/funnelcake-relay
    newTag: "{t["staging"]}"
"""
    crlf = f"""\
# funnelcake-relay — poc (edited on Windows, keep the line endings)
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../base
namespace: funnelcake
images:
  - name: funnelcake-relay
    newName: {r["poc"]}/funnelcake-relay
    newTag: "{t["poc"]}"
"""
    files[overlay_path("relay", "poc")] = crlf.replace("\n", "\r\n").encode()
    return files


def seed_gitops_repo(root: Path, registries: dict[str, str], tags: dict[str, str]) -> GitOpsRemote:
    """Create `root/divine-iac-coreconfig.git` (bare) with base manifests and six overlays."""
    missing = [e for e in ENVS if e not in registries or e not in tags]
    if missing:
        raise ValueError(f"registries and tags need every env; missing {missing}")
    root.mkdir(parents=True, exist_ok=True)
    bare = root / "divine-iac-coreconfig.git"
    work = Path(tempfile.mkdtemp(prefix="seed-gitops-", dir=root))
    try:
        s = _Seeder(work)
        files: dict[str, str | bytes] = {
            "README.md": "# divine-iac-coreconfig\n\nArgo CD sources. One directory per application.\n",
            "k8s/applications/other-service/base/kustomization.yaml": (
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: []\n"
            ),
        }
        for service in SERVICES:
            files[f"k8s/applications/funnelcake-{service}/base/kustomization.yaml"] = _base_kustomization(
                service
            )
            files[f"k8s/applications/funnelcake-{service}/base/deployment.yaml"] = _base_deployment(service)
        files.update(_overlays(registries, tags))
        s.write(files)
        s.commit(_TESTBED, "funnelcake: base manifests and per-env overlays\n")
        s.publish(bare)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return GitOpsRemote(path=bare, registries=dict(registries), tags=dict(tags))


# ---------------------------------------------------------------------------------------------------
# races and the bundle


def push_from_second_clone(
    remote_url: str,
    relpath: str,
    new_content_or_fn: str | bytes | Callable[[str], str],
    message: str,
    *,
    branch: str = BRANCH,
) -> str:
    """Clone elsewhere, change one file, commit and push: what a colleague does while the bot works.

    `new_content_or_fn` is the new file content, or a function from the old text to the new one
    (the text is read and written without newline translation). Returns the pushed sha.
    """
    with tempfile.TemporaryDirectory(prefix="second-clone-") as tmp:
        work = Path(tmp) / "clone"
        git(Path(tmp), "clone", "-q", "--branch", branch, remote_url, str(work))
        target = work / relpath
        if callable(new_content_or_fn):
            old = target.read_bytes().decode() if target.exists() else ""
            data = new_content_or_fn(old).encode()
        elif isinstance(new_content_or_fn, str):
            data = new_content_or_fn.encode()
        else:
            data = new_content_or_fn
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        git(work, "add", "--", relpath)
        who = ("A Colleague", "colleague@divine.video")
        env = {
            "GIT_AUTHOR_NAME": who[0],
            "GIT_AUTHOR_EMAIL": who[1],
            "GIT_COMMITTER_NAME": who[0],
            "GIT_COMMITTER_EMAIL": who[1],
        }
        git(work, "commit", "-q", "--no-verify", "-m", message, env=env)
        git(work, "push", "-q", "origin", f"HEAD:refs/heads/{branch}")
        return git_out(work, "rev-parse", "HEAD")


def remote_head(remote: Path | str, branch: str = BRANCH) -> str:
    path = Path(remote.removeprefix("file://")) if isinstance(remote, str) else remote
    return git_out(path, "rev-parse", f"refs/heads/{branch}")


def remote_file(remote: Path, relpath: str, rev: str = BRANCH) -> bytes:
    return git(remote, "show", f"{rev}:{relpath}").stdout


def funnelcake_config(
    gitops: GitOpsRemote, app: AppRemote | None = None, base: Path | None = None
) -> FunnelcakeConfig:
    """The environments file (config/funnelcake.yaml by default) pointed at these remotes and registries."""
    cfg = load_config(base or DEFAULT_CONFIG_PATH)
    repos = Repos(
        app=Repo(url=app.url if app is not None else cfg.repos.app.url, branch=BRANCH),
        gitops=OverlayRepo(url=gitops.url, branch=gitops.branch),
    )
    envs = [
        e.model_copy(update={"registry": gitops.registries[e.name]}) if e.name in gitops.registries else e
        for e in cfg.environments
    ]
    return cfg.model_copy(update={"repos": repos, "environments": envs})


class GitRemotes:
    """Both remotes under one directory; set-up is synchronous, `start`/`stop` wrap it for async callers."""

    def __init__(
        self,
        root: Path,
        registries: dict[str, str] | None = None,
        deployed: dict[str, str] | None = None,
    ) -> None:
        self.root = root
        self.registries = dict(registries or DEFAULT_REGISTRIES)
        # env -> app-repo commit label (or a literal short tag) deployed in the GitOps overlays
        self.deployed = dict(deployed or DEFAULT_DEPLOYED)
        self._app: AppRemote | None = None
        self._gitops: GitOpsRemote | None = None

    @property
    def app(self) -> AppRemote:
        if self._app is None:
            raise RuntimeError("GitRemotes.setup() has not run")
        return self._app

    @property
    def gitops(self) -> GitOpsRemote:
        if self._gitops is None:
            raise RuntimeError("GitRemotes.setup() has not run")
        return self._gitops

    def setup(self) -> GitRemotes:
        self._app = seed_app_repo(self.root)
        tags = {env: self._app.short(v) if v in self._app.commits else v for env, v in self.deployed.items()}
        self._gitops = seed_gitops_repo(self.root, self.registries, tags)
        return self

    def copy_to(self, root: Path) -> GitRemotes:
        """A copy of already-seeded remotes under another directory (cheaper than seeding again)."""
        app, gitops = self.app, self.gitops
        clone = GitRemotes(root, self.registries, self.deployed)
        root.mkdir(parents=True, exist_ok=True)
        shutil.copytree(app.path, root / app.path.name, symlinks=True)
        shutil.copytree(gitops.path, root / gitops.path.name, symlinks=True)
        clone._app = AppRemote(path=root / app.path.name, commits=dict(app.commits), tags=dict(app.tags))
        clone._gitops = GitOpsRemote(
            path=root / gitops.path.name, registries=dict(gitops.registries), tags=dict(gitops.tags)
        )
        return clone

    def teardown(self) -> None:
        for p in (self.root / "divine-funnelcake.git", self.root / "divine-iac-coreconfig.git"):
            shutil.rmtree(p, ignore_errors=True)
        self._app = self._gitops = None

    async def start(self) -> GitRemotes:
        import asyncio  # noqa: PLC0415 - only the async wrappers need it

        await asyncio.to_thread(self.setup)
        return self

    async def stop(self) -> None:
        import asyncio  # noqa: PLC0415

        await asyncio.to_thread(self.teardown)

    async def __aenter__(self) -> GitRemotes:
        return await self.start()

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class RefusingGitHost:
    """An http git host that answers 401 to everything and records the Authorization headers offered.

    It lets tests check that an https token reaches the host (through the credential helper) and
    never reaches an error message, a log or .git/config.
    """

    def __init__(self) -> None:
        self.authorizations: list[str] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("RefusingGitHost is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/divinevideo/divine-iac-coreconfig.git"

    def start_sync(self) -> RefusingGitHost:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                auth = self.headers.get("Authorization")
                if auth:
                    owner.authorizations.append(auth)
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="test bed"')
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_POST = do_GET

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="refusing-git-host", daemon=True
        )
        self._thread.start()
        return self

    def stop_sync(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    async def start(self) -> RefusingGitHost:
        return self.start_sync()

    async def stop(self) -> None:
        self.stop_sync()


# ---------------------------------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture
def refusing_git_host() -> Iterator[RefusingGitHost]:
    host = RefusingGitHost().start_sync()
    yield host
    host.stop_sync()


@pytest.fixture(scope="session")
def _git_remotes_template(tmp_path_factory: pytest.TempPathFactory) -> GitRemotes:
    # Seeded once per session; each test gets its own copy, because tests push to the remotes.
    return GitRemotes(tmp_path_factory.mktemp("git-remotes-template")).setup()


@pytest.fixture
def git_remotes(tmp_path: Path, _git_remotes_template: GitRemotes) -> Iterator[GitRemotes]:
    remotes = _git_remotes_template.copy_to(tmp_path / "remotes")
    yield remotes
    remotes.teardown()


@pytest.fixture
def app_remote(git_remotes: GitRemotes) -> AppRemote:
    return git_remotes.app


@pytest.fixture
def gitops_remote(git_remotes: GitRemotes) -> GitOpsRemote:
    return git_remotes.gitops


@pytest.fixture
def git_config(git_remotes: GitRemotes) -> FunnelcakeConfig:
    """config/funnelcake.yaml with its repos and registries pointed at the test-bed remotes."""
    return funnelcake_config(git_remotes.gitops, git_remotes.app)
