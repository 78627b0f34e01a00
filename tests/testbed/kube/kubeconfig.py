"""Kubeconfig files for the fake clusters, with the production context names and the GKE exec plugin."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tests.testbed.kube.tls import sandbox_ca

__all__ = ["CONTEXTS", "EXEC_API_VERSION", "PLUGIN", "plugin_env", "write_kubeconfig"]

# The context names `gcloud container fleet memberships get-credentials` writes for each environment.
CONTEXTS: dict[str, str] = {
    "production": "connectgateway_dv-platform-prod_us-central1_gke-production-membership",
    "staging": "connectgateway_dv-platform-staging_us-central1_gke-staging-membership",
    "poc": "connectgateway_rich-compiler-479518-d2_us-central1_gke-poc-membership",
}
EXEC_API_VERSION = "client.authentication.k8s.io/v1beta1"
# The fake plugin shipped next to this module (see its docstring for the env variables it reads).
PLUGIN = Path(__file__).with_name("gke-gcloud-auth-plugin")


def plugin_env(secret: str, *, lifetime: float = 3600, counter: Path | None = None) -> dict[str, str]:
    """The exec `env` entries the fake plugin needs: the HMAC secret, the token lifetime, an invocation counter."""
    env = {"FAKE_GKE_AUTH_SECRET": secret, "FAKE_GKE_AUTH_LIFETIME": str(lifetime)}
    if counter is not None:
        env["FAKE_GKE_AUTH_COUNTER"] = str(counter)
    return env


def _cluster(url: str) -> dict[str, str]:
    """A kubeconfig cluster entry: https servers are the test bed's, trusted through its CA as GKE's are."""
    if url.startswith("https://"):
        return {"server": url, "certificate-authority-data": sandbox_ca().ca_data}
    return {"server": url}


def write_kubeconfig(
    path: Path,
    clusters: Mapping[str, str],
    *,
    exec_plugin: Path | None = None,
    token: str | None = None,
    exec_env: Mapping[str, str] | None = None,
    current_context: str | None = None,
) -> Path:
    """Write one kubeconfig with a context per entry of `clusters` (context name -> server URL).

    Users authenticate with `exec_plugin` (as GKE Connect Gateway contexts do, `user.exec` with
    `exec_env` passed to the plugin) or, without one, with the static `token`. The plugin's
    command is its absolute path so the file works without touching PATH.
    """
    if not clusters:
        raise ValueError("write_kubeconfig needs at least one context")
    user: dict[str, Any] = {}
    if exec_plugin is not None:
        user["exec"] = {
            "apiVersion": EXEC_API_VERSION,
            "command": str(exec_plugin.resolve()),
            "args": [],
            "env": [{"name": k, "value": v} for k, v in (exec_env or {}).items()],
            "provideClusterInfo": True,
            "interactiveMode": "IfAvailable",
            "installHint": "Install gke-gcloud-auth-plugin for use with kubectl by following "
            "https://cloud.google.com/kubernetes-engine/docs/how-to/cluster-access-for-kubectl#install_plugin",
        }
    elif token is not None:
        user["token"] = token
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "preferences": {},
        "current-context": current_context or next(iter(clusters)),
        "clusters": [{"name": name, "cluster": _cluster(url)} for name, url in clusters.items()],
        "users": [{"name": name, "user": dict(user)} for name in clusters],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}} for name in clusters],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
