"""Kube clients against the fake API servers: one client per context, exec-plugin tokens refreshed before expiry
and after a 401, clear errors for missing contexts and a failing plugin."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.adapters.kube import KubeClients, KubeNotFound
from bot.errors import PermanentError, TransientError
from tests.testbed.kube.fixtures import FakeClusters
from tests.testbed.kube.kubeconfig import CONTEXTS, PLUGIN, plugin_env, write_kubeconfig

POC = CONTEXTS["poc"]


@contextlib.asynccontextmanager
async def poc_clients(
    tmp_path: Path, *, lifetime: float = 3600, margin: float = 30
) -> AsyncIterator[tuple[FakeClusters, KubeClients]]:
    async with FakeClusters(tmp_path, ["poc"], token_lifetime=lifetime) as clusters:
        clients = await KubeClients.from_kubeconfig(clusters.kubeconfig, [POC], refresh_margin=margin)
        async with clients:
            yield clusters, clients


async def list_pods(clients: KubeClients, context: str = POC) -> dict:
    c = clients[context]
    return await c.call("pods", c.core.list_namespaced_pod, "funnelcake")


async def test_one_client_per_context_each_reaching_its_own_cluster(
    kubeconfig: Path, kube_clusters: FakeClusters
):
    kube_clusters.stores["staging"].create(
        "secrets", {"metadata": {"name": "only-in-staging", "namespace": "funnelcake"}, "data": {}}
    )
    async with await KubeClients.from_kubeconfig(kubeconfig, CONTEXTS.values()) as clients:
        assert sorted(clients.contexts) == sorted(CONTEXTS.values())
        for env, ctx in CONTEXTS.items():
            c = clients[ctx]
            listing = await c.call("secrets", c.core.list_namespaced_secret, "funnelcake")
            names = [s["metadata"]["name"] for s in listing["items"]]
            assert names == (["only-in-staging"] if env == "staging" else [])
        c = clients[CONTEXTS["poc"]]
        with pytest.raises(KubeNotFound, match="not found"):
            await c.call("secret x", c.core.read_namespaced_secret, "x", "funnelcake")
        with pytest.raises(PermanentError, match="no Kubernetes client for context nope"):
            clients["nope"]


async def test_unknown_context_is_a_clear_error(kubeconfig: Path):
    with pytest.raises(PermanentError, match="cannot load kube context missing-ctx"):
        await KubeClients.from_kubeconfig(kubeconfig, ["missing-ctx"])


async def test_token_refreshed_before_it_expires(tmp_path: Path):
    async with poc_clients(tmp_path, lifetime=2, margin=0.5) as (clusters, clients):
        client = clients[POC]
        await list_pods(clients)
        assert clusters.plugin_invocations() == 1
        expiry = client._auth.expiry
        assert expiry is not None
        # cross into the refresh margin, then past the first token's expiry: every call still succeeds
        while dt.datetime.now(dt.UTC) < expiry + dt.timedelta(seconds=0.1):
            await list_pods(clients)
            await asyncio.sleep(0.2)
        await list_pods(clients)
        assert client.token_refreshes >= 1
        assert client._auth.expiry > expiry
        # a refresh per margin crossing, not per request
        assert clusters.plugin_invocations() <= 1 + client.token_refreshes


async def test_expired_token_gets_a_401_then_one_refresh_and_a_retry(tmp_path: Path):
    async with poc_clients(tmp_path, lifetime=2, margin=0) as (clusters, clients):
        client = clients[POC]
        await list_pods(clients)
        first_expiry = client._auth.expiry
        # a plugin that reports no expirationTimestamp: the client cannot refresh ahead, only after a 401
        client._auth.expiry = None
        await asyncio.sleep((first_expiry - dt.datetime.now(dt.UTC)).total_seconds() + 0.2)
        # ten concurrent requests all hit 401 and share refreshes under the lock; all succeed
        await asyncio.gather(*(list_pods(clients) for _ in range(10)))
        assert client.token_refreshes == 1
        assert clusters.plugin_invocations() == 2


async def test_concurrent_requests_share_one_proactive_refresh(tmp_path: Path):
    async with poc_clients(tmp_path, lifetime=3, margin=1.5) as (clusters, clients):
        client = clients[POC]
        await list_pods(clients)  # the first request fetches the token
        await asyncio.sleep(max(0.0, (client._auth.expiry - dt.datetime.now(dt.UTC)).total_seconds() - 1.4))
        await asyncio.gather(*(list_pods(clients) for _ in range(10)))
        assert client.token_refreshes == 1
        assert clusters.plugin_invocations() == 2


async def test_refused_even_after_refresh_is_permanent(tmp_path: Path):
    async with poc_clients(tmp_path) as (clusters, clients):
        await list_pods(clients)
        clusters.tokens.secret = secrets.token_hex(8)  # the server no longer trusts the plugin's key
        with pytest.raises(PermanentError, match=r"rejected the bot's credentials \(401\)"):
            await list_pods(clients)
        assert clients[POC].token_refreshes == 1  # retried once, not in a loop


async def test_failing_plugin_is_a_clear_error(tmp_path: Path, kube_clusters: FakeClusters):
    path = write_kubeconfig(
        tmp_path / "broken",
        {POC: kube_clusters.apis["poc"].url},
        exec_plugin=PLUGIN,
        exec_env={**plugin_env("s"), "FAKE_GKE_AUTH_FAIL": "ERROR: gcloud auth login required"},
    )
    # reading the kubeconfig runs no plugin: the failure comes with the first request, clearly
    async with await KubeClients.from_kubeconfig(path, [POC]) as clients:
        with pytest.raises(PermanentError, match=f"cannot get credentials for cluster {POC}") as err:
            await list_pods(clients)
    assert "gcloud auth login required" in str(err.value)


async def test_unreachable_cluster_is_transient(tmp_path: Path):
    path = write_kubeconfig(tmp_path / "dead", {POC: "http://127.0.0.1:9"}, token="t")
    async with await KubeClients.from_kubeconfig(path, [POC], request_timeout=2) as clients:
        with pytest.raises(TransientError, match="unreachable"):
            await list_pods(clients)


async def test_watch_replays_the_list_then_streams_changes(kube_clusters: FakeClusters, kubeconfig: Path):
    store = kube_clusters.stores["poc"]
    store.create("secrets", {"metadata": {"name": "a", "namespace": "funnelcake"}})
    async with await KubeClients.from_kubeconfig(kubeconfig, [POC]) as clients:
        c = clients[POC]
        seen: list[tuple[str, str]] = []
        gen = c.watch("secrets", c.core.list_namespaced_secret, "funnelcake", server_timeout=1)
        async with asyncio.timeout(5):
            async for kind, obj in gen:
                seen.append((kind, obj["metadata"]["name"]))
                if len(seen) == 1:
                    store.create("secrets", {"metadata": {"name": "b", "namespace": "funnelcake"}})
                if len(seen) == 2:
                    # the server closes the stream after timeoutSeconds; the watch reconnects from its RV
                    await asyncio.sleep(1.3)
                    store.delete("secrets", "funnelcake", "a")
                if len(seen) == 3:
                    break
        await gen.aclose()
        assert seen == [("ADDED", "a"), ("ADDED", "b"), ("DELETED", "a")]


async def test_watch_relists_after_410(tmp_path: Path):
    async with FakeClusters(tmp_path, ["poc"], history=5) as clusters:
        store = clusters.stores["poc"]
        async with await KubeClients.from_kubeconfig(clusters.kubeconfig, [POC]) as clients:
            c = clients[POC]
            listing = await c.call("secrets", c.core.list_namespaced_secret, "funnelcake")
            old_rv = listing["metadata"]["resourceVersion"]
            for i in range(20):  # push the list's RV out of the server's history window
                store.create("secrets", {"metadata": {"name": f"s{i}", "namespace": "funnelcake"}})
            # a watch from an expired RV must not fail: it re-lists and replays the state
            gen = c.watch("secrets", c.core.list_namespaced_secret, "funnelcake", server_timeout=5)
            names = set()
            async with asyncio.timeout(5):
                async for kind, obj in gen:
                    assert kind == "ADDED"
                    names.add(obj["metadata"]["name"])
                    if len(names) == 20:
                        break
            await gen.aclose()
            assert old_rv  # the stale RV existed; the watch recovered through a fresh list


async def test_clients_are_lazy_and_three_contexts_share_one_plugin_run(tmp_path: Path):
    async with (
        FakeClusters(tmp_path, list(CONTEXTS)) as clusters,
        await KubeClients.from_kubeconfig(clusters.kubeconfig, CONTEXTS.values()) as clients,
    ):
        # reading the kubeconfig builds no client and runs no plugin
        assert clients.built == []
        assert clusters.plugin_invocations() == 0
        assert set(clients.contexts) == set(CONTEXTS.values())
        await asyncio.gather(*(list_pods(clients, ctx) for ctx in CONTEXTS.values()))
        # the same plugin stanza for each context: its unexpired token serves all three
        assert clusters.plugin_invocations() == 1
        assert sorted(clients.built) == sorted(CONTEXTS.values())


async def test_the_plugin_gets_the_callers_environment_but_not_the_bots_secrets(
    tmp_path: Path, kube_clusters: FakeClusters, monkeypatch: pytest.MonkeyPatch
):
    seen = tmp_path / "plugin-env"
    wrapper = tmp_path / "recording-plugin"
    # records the names it was given, then is the fake gke-gcloud-auth-plugin
    wrapper.write_text(
        "#!/usr/bin/env python3\n"
        "import os, sys\n"
        f"open({str(seen)!r}, 'w').write('\\n'.join(sorted(os.environ)))\n"
        f"os.execv(sys.executable, [sys.executable, {str(PLUGIN)!r}])\n"
    )
    wrapper.chmod(0o755)
    path = write_kubeconfig(
        tmp_path / "recording",
        {POC: kube_clusters.apis["poc"].url},
        exec_plugin=wrapper,
        exec_env=plugin_env(kube_clusters.secret),
    )
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-not-for-plugins")
    monkeypatch.setenv("DATABASE_URL", "postgresql://bot:hunter2@db/ledger")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    async with await KubeClients.from_kubeconfig(path, [POC]) as clients:
        await list_pods(clients)
    names = set(seen.read_text().split())
    assert {"CLOUDSDK_CONFIG", "PATH", "FAKE_GKE_AUTH_SECRET", "KUBERNETES_EXEC_INFO"} <= names
    assert not names & {"SLACK_BOT_TOKEN", "DATABASE_URL"}
