"""The fake Kubernetes API server, proved through kubernetes_asyncio's typed clients over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.testbed.kube.apiserver import FakeKubeAPI, TokenCheck, mint_token
from tests.testbed.kube.fixtures import FakeClusters
from tests.testbed.kube.kubeconfig import CONTEXTS, PLUGIN, plugin_env, write_kubeconfig
from tests.testbed.kube.store import Store, StoreError

NS = "funnelcake"
pytestmark = pytest.mark.timeout(30)


def deployment(
    name: str = "funnelcake-api", image: str = "reg/funnelcake-api:abc1234", **labels: str
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": {"app": name, **labels}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "containers": [
                        {
                            "name": "api",
                            "image": image,
                            "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                            "ports": [{"containerPort": 8080, "name": "http"}],
                        },
                        {"name": "sidecar", "image": "busybox"},
                    ]
                },
            },
        },
    }


def container_status(name: str, state: dict[str, Any]) -> dict[str, Any]:
    # The typed client refuses a ContainerStatus without image, imageID, ready and restartCount.
    return {
        "name": name,
        "state": state,
        "image": "i",
        "imageID": "",
        "ready": "running" in state,
        "restartCount": 0,
    }


def application(name: str = "funnelcake-api") -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": name, "namespace": "argocd"},
        "spec": {"project": "default", "source": {"repoURL": "https://example/iac", "path": "k8s"}},
    }


@pytest.fixture
async def api_client(kube_api_kubeconfig: Path) -> AsyncIterator[client.ApiClient]:
    api = await config.new_client_from_config(
        config_file=str(kube_api_kubeconfig), context="fake", persist_config=False
    )
    async with api:
        yield api


def status_of(exc: ApiException) -> dict[str, Any]:
    body = json.loads(exc.body)
    assert body["kind"] == "Status"
    assert body["apiVersion"] == "v1"
    assert body["status"] == "Failure"
    assert body["code"] == exc.status
    return body


# -- metadata, generation, status ----------------------------------------------------------------------------


async def test_create_fills_metadata_and_get_round_trips(api_client: client.ApiClient) -> None:
    apps = client.AppsV1Api(api_client)
    created = await apps.create_namespaced_deployment(NS, {**deployment(), "status": {"replicas": 5}})
    meta = created.metadata
    assert meta.namespace == NS
    assert re.fullmatch(r"[0-9a-f-]{36}", meta.uid)
    assert meta.generation == 1
    assert int(meta.resource_version) > 0
    assert created.status is None or created.status.replicas is None
    raw = await apps.read_namespaced_deployment("funnelcake-api", NS, _preload_content=False)
    body = await raw.json()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["metadata"]["creationTimestamp"])
    assert body["kind"] == "Deployment"
    assert body["apiVersion"] == "apps/v1"

    with pytest.raises(ApiException) as err:
        await apps.create_namespaced_deployment(NS, deployment())
    assert err.value.status == 409
    assert status_of(err.value)["reason"] == "AlreadyExists"

    with pytest.raises(ApiException) as err:
        await apps.read_namespaced_deployment("nope", NS)
    assert err.value.status == 404
    assert status_of(err.value)["message"] == 'deployments.apps "nope" not found'


async def test_generate_name_and_resource_versions_increase_globally(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    a = await core.create_namespaced_secret(
        NS, {"metadata": {"generateName": "creds-"}, "data": {"k": "dg=="}}
    )
    b = await core.create_namespaced_secret(NS, {"metadata": {"generateName": "creds-"}})
    assert a.metadata.name.startswith("creds-")
    assert a.metadata.name != b.metadata.name
    assert int(b.metadata.resource_version) > int(a.metadata.resource_version)


async def test_generation_bumps_on_spec_change_only(api_client: client.ApiClient) -> None:
    apps = client.AppsV1Api(api_client)
    await apps.create_namespaced_deployment(NS, deployment())
    labelled = await apps.patch_namespaced_deployment(
        "funnelcake-api", NS, {"metadata": {"labels": {"x": "y"}}}
    )
    assert labelled.metadata.generation == 1
    status = await apps.patch_namespaced_deployment_status(
        "funnelcake-api", NS, {"status": {"observedGeneration": 1, "replicas": 2}}
    )
    assert status.metadata.generation == 1
    assert status.status.replicas == 2
    assert int(status.metadata.resource_version) > int(labelled.metadata.resource_version)
    bumped = await apps.patch_namespaced_deployment("funnelcake-api", NS, {"spec": {"replicas": 3}})
    assert bumped.metadata.generation == 2
    # A main-resource write cannot change status; a status write cannot change spec.
    ignored = await apps.patch_namespaced_deployment("funnelcake-api", NS, {"status": {"replicas": 9}})
    assert ignored.status.replicas == 2
    ignored = await apps.patch_namespaced_deployment_status("funnelcake-api", NS, {"spec": {"replicas": 7}})
    assert ignored.spec.replicas == 3
    assert ignored.metadata.generation == 2


async def test_replace_keeps_status_and_rejects_stale_resource_version(api_client: client.ApiClient) -> None:
    apps = client.AppsV1Api(api_client)
    first = await apps.create_namespaced_deployment(NS, deployment())
    await apps.patch_namespaced_deployment_status("funnelcake-api", NS, {"status": {"replicas": 2}})
    current = await apps.read_namespaced_deployment("funnelcake-api", NS)
    current.spec.replicas = 5
    current.status = None
    replaced = await apps.replace_namespaced_deployment("funnelcake-api", NS, current)
    assert replaced.spec.replicas == 5
    assert replaced.status.replicas == 2
    assert replaced.metadata.generation == 2
    assert replaced.metadata.uid == first.metadata.uid

    current.spec.replicas = 6  # still carries the resourceVersion read before the replace
    with pytest.raises(ApiException) as err:
        await apps.replace_namespaced_deployment("funnelcake-api", NS, current)
    assert err.value.status == 409
    assert status_of(err.value)["reason"] == "Conflict"
    with pytest.raises(ApiException) as err:
        await apps.patch_namespaced_deployment(
            "funnelcake-api",
            NS,
            {"metadata": {"resourceVersion": first.metadata.resource_version}, "spec": {"replicas": 1}},
        )
    assert err.value.status == 409


async def test_application_has_no_status_subresource_and_operation_bumps_generation(
    api_client: client.ApiClient,
) -> None:
    custom = client.CustomObjectsApi(api_client)
    args = ("argoproj.io", "v1alpha1", "argocd", "applications")
    await custom.create_namespaced_custom_object(*args, application())
    with_status = await custom.patch_namespaced_custom_object(
        *args,
        "funnelcake-api",
        {"status": {"sync": {"status": "Synced"}}},
        _content_type="application/merge-patch+json",
    )
    assert with_status["status"]["sync"]["status"] == "Synced"  # status is written through the main resource
    # without a status subresource, a status write is a change like any other: generation moves
    assert with_status["metadata"]["generation"] == 2
    labelled = await custom.patch_namespaced_custom_object(
        *args,
        "funnelcake-api",
        {"metadata": {"labels": {"x": "y"}}},
        _content_type="application/merge-patch+json",
    )
    assert labelled["metadata"]["generation"] == 2  # metadata never counts
    op = await custom.patch_namespaced_custom_object(
        *args,
        "funnelcake-api",
        {"operation": {"sync": {"revision": "HEAD"}}},
        _content_type="application/merge-patch+json",
    )
    assert op["metadata"]["generation"] == 3
    with pytest.raises(ApiException) as err:
        await custom.patch_namespaced_custom_object_status(
            *args, "funnelcake-api", {"status": {}}, _content_type="application/merge-patch+json"
        )
    assert err.value.status == 404
    status_of(err.value)


# -- selectors -----------------------------------------------------------------------------------------------


async def test_label_and_field_selectors(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    for name, labels, phase in [
        ("a", {"app": "api", "tier": "web"}, "Running"),
        ("b", {"app": "relay", "tier": "web"}, "Pending"),
        ("c", {"app": "migrate"}, "Running"),
    ]:
        await core.create_namespaced_pod(
            NS,
            {
                "metadata": {"name": name, "labels": labels},
                "spec": {"containers": [{"name": "x", "image": "i"}]},
            },
        )
        await core.patch_namespaced_pod_status(name, NS, {"status": {"phase": phase}})
    await core.create_namespaced_pod(
        "other",
        {
            "metadata": {"name": "a", "labels": {"app": "api"}},
            "spec": {"containers": [{"name": "x", "image": "i"}]},
        },
    )

    async def names(**kw: Any) -> list[str]:
        return sorted(p.metadata.name for p in (await core.list_namespaced_pod(NS, **kw)).items)

    assert await names(label_selector="app=api") == ["a"]
    assert await names(label_selector="app==api") == ["a"]
    assert await names(label_selector="app!=api") == ["b", "c"]
    assert await names(label_selector="app in (api, relay)") == ["a", "b"]
    assert await names(label_selector="app notin (api,relay)") == ["c"]
    assert await names(label_selector="tier") == ["a", "b"]
    assert await names(label_selector="!tier") == ["c"]
    assert await names(label_selector="tier=web,app in (relay,migrate)") == ["b"]
    assert await names(field_selector="status.phase=Running") == ["a", "c"]
    assert await names(field_selector="status.phase!=Running") == ["b"]
    assert await names(field_selector="metadata.name==b") == ["b"]
    everywhere = await core.list_pod_for_all_namespaces(field_selector="metadata.name=a")
    assert sorted(p.metadata.namespace for p in everywhere.items) == [NS, "other"]
    only_other = await core.list_pod_for_all_namespaces(field_selector="metadata.namespace=other")
    assert [p.metadata.namespace for p in only_other.items] == ["other"]
    with pytest.raises(ApiException) as err:
        await core.list_namespaced_pod(NS, label_selector="app in (api")
    assert err.value.status == 400


async def test_event_field_selectors(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    for i, (kind, name) in enumerate([("Pod", "api-1"), ("Pod", "relay-1"), ("Deployment", "api-1")]):
        await core.create_namespaced_event(
            NS,
            {
                "metadata": {"name": f"ev{i}"},
                "involvedObject": {"kind": kind, "name": name, "namespace": NS},
                "reason": "Failed",
                "message": 'Failed to pull image "x": not found',
                "type": "Warning",
            },
        )
    events = await core.list_namespaced_event(
        NS, field_selector="involvedObject.name=api-1,involvedObject.kind=Pod"
    )
    assert [e.metadata.name for e in events.items] == ["ev0"]
    listed = await core.list_namespaced_event(NS, _preload_content=False)
    body = await listed.json()
    assert body["kind"] == "EventList"
    assert body["apiVersion"] == "v1"
    assert body["metadata"]["resourceVersion"] == str(3)


# -- watch ---------------------------------------------------------------------------------------------------


async def test_watch_true_from_resource_version_with_timeout(api_client: client.ApiClient) -> None:
    apps = client.AppsV1Api(api_client)
    await apps.create_namespaced_deployment(NS, deployment("one"))
    listing = await apps.list_namespaced_deployment(NS)
    rv = listing.metadata.resource_version

    async def change() -> None:
        await asyncio.sleep(0.1)
        await apps.patch_namespaced_deployment("one", NS, {"spec": {"replicas": 4}})
        await apps.create_namespaced_deployment(NS, deployment("two"))
        await apps.delete_namespaced_deployment("one", NS)

    task = asyncio.create_task(change(), name="watch-test-changes")
    seen: list[tuple[str, str]] = []
    started = time.monotonic()
    w = watch.Watch()
    # Watch.stream sends watch=True (capital T), which the server must accept like watch=true.
    async for event in w.stream(apps.list_namespaced_deployment, NS, resource_version=rv, timeout_seconds=1):
        seen.append((event["type"], event["object"].metadata.name))
    await task
    elapsed = time.monotonic() - started
    assert seen == [("MODIFIED", "one"), ("ADDED", "two"), ("DELETED", "one")]
    assert 0.9 <= elapsed < 3, "the stream should end cleanly when timeoutSeconds elapses"


async def test_watch_sends_lowercase_true_too_and_replays_history(
    kube_api: FakeKubeAPI, kube_store: Store
) -> None:
    created = kube_store.create(
        "pods", {"metadata": {"name": "p", "namespace": NS}, "spec": {"containers": []}}
    )
    kube_store.update("pods", NS, "p", lambda o: o["metadata"].setdefault("labels", {}).update(a="b"))
    async with aiohttp.ClientSession() as http:
        url = f"{kube_api.url}/api/v1/namespaces/{NS}/pods"
        params = {
            "watch": "true",
            "resourceVersion": created["metadata"]["resourceVersion"],
            "timeoutSeconds": "1",
        }
        async with http.get(url, params=params) as resp:
            assert resp.status == 200
            lines = [json.loads(line) async for line in resp.content if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["labels"]) for e in lines] == [("MODIFIED", {"a": "b"})]


async def test_watch_without_resource_version_starts_with_synthetic_added_and_honours_selectors(
    api_client: client.ApiClient,
) -> None:
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_pod(
        NS, {"metadata": {"name": "p1", "labels": {"app": "api"}}, "spec": {"containers": []}}
    )
    await core.create_namespaced_pod(
        NS, {"metadata": {"name": "p2", "labels": {"app": "relay"}}, "spec": {"containers": []}}
    )

    async def change() -> None:
        await asyncio.sleep(0.1)
        # p2 starts matching, p1 stops matching: the watcher sees ADDED and DELETED, like the real server.
        await core.patch_namespaced_pod("p2", NS, {"metadata": {"labels": {"app": "api"}}})
        await core.patch_namespaced_pod("p1", NS, {"metadata": {"labels": {"app": "gone"}}})

    task = asyncio.create_task(change(), name="selector-watch-changes")
    seen = [
        (e["type"], e["object"].metadata.name)
        async for e in watch.Watch().stream(
            core.list_namespaced_pod, NS, label_selector="app=api", timeout_seconds=1
        )
    ]
    await task
    assert seen == [("ADDED", "p1"), ("ADDED", "p2"), ("DELETED", "p1")]


async def test_watch_from_expired_resource_version_is_410(tmp_path: Path) -> None:
    store = Store(history=5)
    async with FakeKubeAPI(store) as server:
        for i in range(10):
            store.create("secrets", {"metadata": {"name": f"s{i}", "namespace": NS}})
        kc = write_kubeconfig(tmp_path / "kc", {"fake": server.url})
        async with await config.new_client_from_config(
            config_file=str(kc), context="fake", persist_config=False
        ) as api:
            core = client.CoreV1Api(api)
            # With timeout_seconds set, Watch does not retry a 410 by itself: it raises.
            with pytest.raises(ApiException) as err:
                async for _ in watch.Watch().stream(
                    core.list_namespaced_secret, NS, resource_version="2", timeout_seconds=1
                ):
                    pass
            assert err.value.status == 410
            assert "Expired" in str(err.value.reason)
            # Still inside the window: replayed from history.
            w = watch.Watch()
            recent = [
                e["object"].metadata.name
                async for e in w.stream(
                    core.list_namespaced_secret, NS, resource_version="7", timeout_seconds=1
                )
            ]
            assert recent == ["s7", "s8", "s9"]
        async with aiohttp.ClientSession() as http:
            params = {"watch": "True", "resourceVersion": "2"}
            async with http.get(f"{server.url}/api/v1/namespaces/{NS}/secrets", params=params) as resp:
                assert resp.status == 200
                events = [json.loads(line) async for line in resp.content if line.strip()]
        assert len(events) == 1
        assert events[0]["type"] == "ERROR"
        assert events[0]["object"]["kind"] == "Status"
        assert events[0]["object"]["code"] == 410
        assert events[0]["object"]["reason"] == "Expired"


async def test_watch_is_released_when_the_client_goes_away_or_the_server_stops(
    kube_api: FakeKubeAPI, kube_store: Store
) -> None:
    kube_store.create("pods", {"metadata": {"name": "p", "namespace": NS}, "spec": {"containers": []}})
    async with aiohttp.ClientSession() as http:
        resp = await http.get(f"{kube_api.url}/api/v1/namespaces/{NS}/pods", params={"watch": "True"})
        first = json.loads(await resp.content.readline())
        assert first["type"] == "ADDED"
        assert kube_store.watch_count("pods") == 1
        resp.close()
    for _ in range(100):
        if kube_store.watch_count() == 0:
            break
        await asyncio.sleep(0.02)
    assert kube_store.watch_count() == 0
    # A watch still open when the server stops is ended, not leaked.
    http = aiohttp.ClientSession()
    try:
        resp = await http.get(f"{kube_api.url}/api/v1/pods", params={"watch": "true"})
        await resp.content.readline()
        assert kube_store.watch_count("pods") == 1
        await asyncio.wait_for(kube_api.stop(), 5)
        assert kube_store.watch_count() == 0
    finally:
        await http.close()


def test_store_keeps_bounded_history_however_many_writes() -> None:
    """Per-operation cost must not grow with traffic: nothing but the bounded history remembers past writes."""
    store = Store(history=50)
    store.create("applications", {"metadata": {"name": "a", "namespace": "argocd"}, "spec": {}})
    for i in range(500):
        store.patch(
            "applications",
            "argocd",
            "a",
            {"metadata": {"annotations": {"i": str(i)}}},
            "application/merge-patch+json",
        )
    assert store.history_size() == 50
    assert store.resource_version == "501"
    store.check_watch_start("applications", "451")  # the oldest still replayable
    with pytest.raises(StoreError) as err:
        store.check_watch_start("applications", "450")
    assert (err.value.code, err.value.reason) == (410, "Expired")
    # A patch that changes nothing does not bump the resourceVersion, like the real server.
    store.patch(
        "applications",
        "argocd",
        "a",
        {"metadata": {"annotations": {"i": "499"}}},
        "application/merge-patch+json",
    )
    assert store.resource_version == "501"


async def test_store_watch_and_subscribe_for_in_process_controllers() -> None:
    store = Store()
    queue = store.subscribe()
    store.create("jobs", {"metadata": {"name": "j", "namespace": NS}, "spec": {}})
    got: list[tuple[str, str]] = []

    async def consume() -> None:
        async for event_type, obj in store.watch("jobs", NS, resource_version="0"):
            got.append((event_type, obj["metadata"]["name"]))
            if len(got) == 2:
                return

    task = asyncio.create_task(consume(), name="store-watch")
    await asyncio.sleep(0)
    store.delete("jobs", NS, "j")
    await asyncio.wait_for(task, 2)
    assert got == [("ADDED", "j"), ("DELETED", "j")]
    assert [(t, r) for t, r, _ in [queue.get_nowait(), queue.get_nowait()]] == [
        ("ADDED", "jobs"),
        ("DELETED", "jobs"),
    ]
    store.unsubscribe(queue)
    store.create("jobs", {"metadata": {"name": "k", "namespace": NS}, "spec": {}})
    assert queue.empty()
    # Copies in and out: mutating a returned object changes nothing stored.
    got_obj = store.get("jobs", NS, "k")
    assert got_obj is not None
    got_obj["spec"]["x"] = 1
    assert store.get("jobs", NS, "k") == {**got_obj, "spec": {}}


# -- patch content types -------------------------------------------------------------------------------------


async def test_strategic_merge_patch_merges_containers_and_env_by_name(api_client: client.ApiClient) -> None:
    apps = client.AppsV1Api(api_client)
    await apps.create_namespaced_deployment(NS, deployment())
    # A dict body on a built-in goes out as strategic-merge-patch+json.
    patched = await apps.patch_namespaced_deployment(
        "funnelcake-api",
        NS,
        {
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "api",
                                "image": "reg/funnelcake-api:def5678",
                                "env": [{"name": "B", "value": "two"}, {"name": "C", "value": "3"}],
                                "ports": [{"containerPort": 9090, "name": "metrics"}],
                            }
                        ]
                    }
                }
            }
        },
    )
    containers = patched.spec.template.spec.containers
    assert [c.name for c in containers] == ["api", "sidecar"]
    api = containers[0]
    assert api.image == "reg/funnelcake-api:def5678"
    assert [(e.name, e.value) for e in api.env] == [("A", "1"), ("B", "two"), ("C", "3")]
    assert [p.container_port for p in api.ports] == [8080, 9090]
    assert patched.metadata.generation == 2
    removed = await apps.patch_namespaced_deployment(
        "funnelcake-api",
        NS,
        {"spec": {"template": {"spec": {"containers": [{"name": "sidecar", "$patch": "delete"}]}}}},
    )
    assert [c.name for c in removed.spec.template.spec.containers] == ["api"]
    # Conditions merge by type through the status subresource.
    await apps.patch_namespaced_deployment_status(
        "funnelcake-api",
        NS,
        {
            "status": {
                "conditions": [
                    {"type": "Available", "status": "False"},
                    {"type": "Progressing", "status": "True"},
                ]
            }
        },
    )
    st = await apps.patch_namespaced_deployment_status(
        "funnelcake-api", NS, {"status": {"conditions": [{"type": "Available", "status": "True"}]}}
    )
    assert [(c.type, c.status) for c in st.status.conditions] == [
        ("Available", "True"),
        ("Progressing", "True"),
    ]


async def test_merge_patch_replaces_lists_and_null_deletes(api_client: client.ApiClient) -> None:
    apps = client.AppsV1Api(api_client)
    await apps.create_namespaced_deployment(NS, deployment(team="x"))
    patched = await apps.patch_namespaced_deployment(
        "funnelcake-api",
        NS,
        {
            "metadata": {"labels": {"team": None}},
            "spec": {"template": {"spec": {"containers": [{"name": "only", "image": "i"}]}}},
        },
        _content_type="application/merge-patch+json",
    )
    assert patched.metadata.labels == {"app": "funnelcake-api"}
    assert [c.name for c in patched.spec.template.spec.containers] == ["only"]


async def test_json_patch_list_applies_and_object_body_is_400(api_client: client.ApiClient) -> None:
    apps = client.AppsV1Api(api_client)
    await apps.create_namespaced_deployment(NS, deployment())
    patched = await apps.patch_namespaced_deployment(
        "funnelcake-api",
        NS,
        [
            {"op": "test", "path": "/spec/replicas", "value": 2},
            {"op": "replace", "path": "/spec/template/spec/containers/0/image", "value": "img:2"},
            {"op": "add", "path": "/metadata/annotations", "value": {"a/b": "c"}},
            {
                "op": "add",
                "path": "/spec/template/spec/containers/0/env/-",
                "value": {"name": "Z", "value": "z"},
            },
            {"op": "remove", "path": "/spec/template/spec/containers/1"},
        ],
    )
    assert patched.spec.template.spec.containers[0].image == "img:2"
    assert patched.metadata.annotations == {"a/b": "c"}
    assert [e.name for e in patched.spec.template.spec.containers[0].env] == ["A", "B", "Z"]
    assert len(patched.spec.template.spec.containers) == 1
    with pytest.raises(ApiException) as err:
        await apps.patch_namespaced_deployment(
            "funnelcake-api", NS, [{"op": "test", "path": "/spec/replicas", "value": 99}]
        )
    assert err.value.status == 422
    status_of(err.value)
    with pytest.raises(ApiException) as err:
        await apps.patch_namespaced_deployment(
            "funnelcake-api", NS, {"spec": {"replicas": 1}}, _content_type="application/json-patch+json"
        )
    assert err.value.status == 400
    assert status_of(err.value)["reason"] == "BadRequest"
    with pytest.raises(ApiException) as err:
        await apps.patch_namespaced_deployment(
            "funnelcake-api", NS, [{"op": "replace", "path": "/metadata/resourceVersion", "value": "1"}]
        )
    assert err.value.status == 409


async def test_custom_object_patch_content_types(api_client: client.ApiClient) -> None:
    custom = client.CustomObjectsApi(api_client)
    args = ("argoproj.io", "v1alpha1", "argocd", "applications")
    await custom.create_namespaced_custom_object(*args, application())
    # DESIGN §7: with a dict body CustomObjectsApi picks json-patch, which a real server rejects.
    with pytest.raises(ApiException) as err:
        await custom.patch_namespaced_custom_object(
            *args, "funnelcake-api", {"metadata": {"annotations": {"a": "b"}}}
        )
    assert err.value.status == 400
    with pytest.raises(ApiException) as err:
        await custom.patch_namespaced_custom_object(
            *args, "funnelcake-api", {"metadata": {}}, _content_type="application/strategic-merge-patch+json"
        )
    assert err.value.status == 415
    assert status_of(err.value)["reason"] == "UnsupportedMediaType"
    refreshed = await custom.patch_namespaced_custom_object(
        *args,
        "funnelcake-api",
        {"metadata": {"annotations": {"argocd.argoproj.io/refresh": "hard"}}},
        _content_type="application/merge-patch+json",
    )
    assert refreshed["metadata"]["annotations"] == {"argocd.argoproj.io/refresh": "hard"}
    listed = await custom.list_namespaced_custom_object(*args)
    assert listed["kind"] == "ApplicationList"
    assert [i["metadata"]["name"] for i in listed["items"]] == ["funnelcake-api"]
    gone = await custom.delete_namespaced_custom_object(*args, "funnelcake-api")
    assert gone["metadata"]["name"] == "funnelcake-api"
    with pytest.raises(ApiException) as err:
        await custom.get_namespaced_custom_object(*args, "funnelcake-api")
    assert err.value.status == 404


# -- delete --------------------------------------------------------------------------------------------------


async def test_delete_job_cascades_pods_unless_orphaned(api_client: client.ApiClient) -> None:
    batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)

    async def job_with_pod(name: str) -> None:
        job = await batch.create_namespaced_job(
            NS,
            {
                "metadata": {"name": name},
                "spec": {
                    "backoffLimit": 3,
                    "template": {
                        "spec": {"containers": [{"name": "m", "image": "i"}], "restartPolicy": "Never"}
                    },
                },
            },
        )
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": name,
            "uid": job.metadata.uid,
            "controller": True,
        }
        await core.create_namespaced_pod(
            NS,
            {
                "metadata": {"name": f"{name}-pod", "labels": {"job-name": name}, "ownerReferences": [owner]},
                "spec": {"containers": [{"name": "m", "image": "i"}]},
            },
        )

    await core.create_namespaced_pod(
        NS, {"metadata": {"name": "lonely"}, "spec": {"containers": [{"name": "m", "image": "i"}]}}
    )
    deleted_pod = await core.delete_namespaced_pod("lonely", NS)
    assert deleted_pod.metadata.name == "lonely"  # pods answer with the object, like the real server
    await job_with_pod("bg")
    await job_with_pod("orphan")
    status = await batch.delete_namespaced_job("bg", NS, propagation_policy="Background")
    assert status.status == "Success"
    # The default for batch/v1 Jobs is to orphan the pods, as on a real server.
    await batch.delete_namespaced_job("orphan", NS)
    pods = await core.list_namespaced_pod(NS)
    assert [p.metadata.name for p in pods.items] == ["orphan-pod"]
    with pytest.raises(ApiException) as err:
        await batch.delete_namespaced_job("bg", NS)
    assert err.value.status == 404


# -- logs ----------------------------------------------------------------------------------------------------


async def test_pod_logs_plain_text_and_400_while_waiting(
    api_client: client.ApiClient, kube_store: Store
) -> None:
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_pod(
        NS, {"metadata": {"name": "migrate"}, "spec": {"containers": [{"name": "migrate", "image": "i"}]}}
    )
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod_log("migrate", NS)
    assert err.value.status == 400
    assert (
        status_of(err.value)["message"]
        == 'container "migrate" in pod "migrate" is waiting to start: ContainerCreating'
    )
    await core.patch_namespaced_pod_status(
        "migrate",
        NS,
        {
            "status": {
                "containerStatuses": [
                    container_status("migrate", {"waiting": {"reason": "ImagePullBackOff"}})
                ]
            }
        },
    )
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod_log("migrate", NS, container="migrate")
    assert "is waiting to start: trying and failing to pull image" in status_of(err.value)["message"]
    await core.patch_namespaced_pod_status(
        "migrate", NS, {"status": {"containerStatuses": [container_status("migrate", {"running": {}})]}}
    )
    kube_store.set_log(
        NS, "migrate", "migrate", "1/u create_events (23.4ms)\n2/u add_index (3.1ms)\nno change\n"
    )
    assert (
        await core.read_namespaced_pod_log("migrate", NS)
        == "1/u create_events (23.4ms)\n2/u add_index (3.1ms)\nno change\n"
    )
    assert await core.read_namespaced_pod_log("migrate", NS, tail_lines=1) == "no change\n"
    raw = await core.read_namespaced_pod_log("migrate", NS, _preload_content=False)
    assert raw.content_type == "text/plain"
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod_log("migrate", NS, previous=True)
    assert err.value.status == 400
    kube_store.rotate_log(NS, "migrate", "migrate")
    kube_store.append_log(
        NS, "migrate", "migrate", "error: Dirty database version 3. Fix and force version.\n"
    )
    assert "create_events" in await core.read_namespaced_pod_log("migrate", NS, previous=True)
    assert (await core.read_namespaced_pod_log("migrate", NS)).startswith("error: Dirty database version 3")
    with pytest.raises(ApiException) as err:
        await core.read_namespaced_pod_log("migrate", NS, container="nope")
    assert err.value.status == 400


async def test_pod_log_follow_streams_until_terminated(kube_api: FakeKubeAPI, kube_store: Store) -> None:
    kube_store.create(
        "pods", {"metadata": {"name": "m", "namespace": NS}, "spec": {"containers": [{"name": "c"}]}}
    )
    kube_store.update(
        "pods",
        NS,
        "m",
        lambda p: p.update(status={"containerStatuses": [{"name": "c", "state": {"running": {}}}]}),
        subresource="status",
    )
    kube_store.set_log(NS, "m", "c", "one\n")

    async def kubelet() -> None:
        await asyncio.sleep(0.1)
        kube_store.append_log(NS, "m", "c", "two\n")
        await asyncio.sleep(0.1)
        kube_store.update(
            "pods",
            NS,
            "m",
            lambda p: p.update(
                status={"containerStatuses": [{"name": "c", "state": {"terminated": {"exitCode": 0}}}]}
            ),
            subresource="status",
        )

    task = asyncio.create_task(kubelet(), name="fake-kubelet")
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{kube_api.url}/api/v1/namespaces/{NS}/pods/m/log", params={"follow": "true"}) as resp,
    ):
        text = await asyncio.wait_for(resp.text(), 5)
    await task
    assert text == "one\ntwo\n"


# -- discovery, errors, auth ---------------------------------------------------------------------------------


async def test_discovery_and_unknown_paths(api_client: client.ApiClient, kube_api: FakeKubeAPI) -> None:
    version = await client.VersionApi(api_client).get_code()
    assert version.major == "1"
    groups = await client.ApisApi(api_client).get_api_versions()
    assert {g.name for g in groups.groups} == {"apps", "batch", "argoproj.io", "authorization.k8s.io"}
    resources = await client.AppsV1Api(api_client).get_api_resources()
    assert {r.name for r in resources.resources} == {
        "deployments",
        "deployments/status",
        "deployments/scale",
        "replicasets",
        "replicasets/status",
        "replicasets/scale",
    }
    assert {r.name: r.short_names for r in resources.resources}["deployments"] == ["deploy"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{kube_api.url}/apis/apps/v1/namespaces/x/statefulsets") as resp:
            assert resp.status == 404
            body = await resp.json()
        assert body["kind"] == "Status"
        assert body["reason"] == "NotFound"
        async with http.get(f"{kube_api.url}/healthz/nothing-here") as resp:
            assert resp.status == 404
            assert (await resp.json())["kind"] == "Status"
        async with http.post(f"{kube_api.url}/api/v1/pods", json={}) as resp:
            assert resp.status == 405
            assert (await resp.json())["reason"] == "MethodNotAllowed"
        async with http.patch(
            f"{kube_api.url}/api/v1/namespaces/x/pods/p",
            json={},
            headers={"Content-Type": "application/apply-patch+yaml"},
        ) as resp:
            assert resp.status == 404  # the pod does not exist: checked before the patch type
        async with http.post(f"{kube_api.url}/api/v1/namespaces/x/pods", data=b"{nope") as resp:
            assert resp.status == 400
            assert (await resp.json())["reason"] == "BadRequest"


async def test_bearer_token_check(tmp_path: Path) -> None:
    secret = "s3cret"
    clock = [time.time()]
    store = Store()
    async with FakeKubeAPI(
        store, tokens=TokenCheck(secret, static_tokens=("static-token",), clock=lambda: clock[0])
    ) as server:
        token, expiry = mint_token(secret, 60)
        async with aiohttp.ClientSession() as http:
            url = f"{server.url}/api/v1/namespaces/{NS}/pods"
            async with http.get(url) as resp:
                assert resp.status == 401
                body = await resp.json()
                assert body == {
                    **body,
                    "kind": "Status",
                    "code": 401,
                    "reason": "Unauthorized",
                    "status": "Failure",
                }
            for bad in ("garbage", f"fake.{expiry}.{'0' * 64}", token + "x"):
                async with http.get(url, headers={"Authorization": f"Bearer {bad}"}) as resp:
                    assert resp.status == 401
            for good in (token, "static-token"):
                async with http.get(url, headers={"Authorization": f"Bearer {good}"}) as resp:
                    assert resp.status == 200
            clock[0] = expiry + 1
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 401


async def test_exec_plugin_authenticates_three_isolated_clusters(
    kube_clusters: FakeClusters, kubeconfig: Path
) -> None:
    contexts, current = config.list_kube_config_contexts(str(kubeconfig))
    assert {c["name"] for c in contexts} == set(CONTEXTS.values())
    assert current["name"] == CONTEXTS["production"]
    assert current["context"]["user"] == current["name"]
    for env, context in CONTEXTS.items():
        async with await config.new_client_from_config(
            config_file=str(kubeconfig), context=context, persist_config=False
        ) as api:
            await client.CoreV1Api(api).create_namespaced_secret(NS, {"metadata": {"name": f"only-in-{env}"}})
    for env, store in kube_clusters.stores.items():
        names = [s["metadata"]["name"] for s in store.list("secrets")[0]]
        assert names == [f"only-in-{env}"]
    assert kube_clusters.plugin_invocations() == 3
    assert all(api.unauthorized == 0 for api in kube_clusters.apis.values())


async def test_expired_exec_token_gives_401_until_the_config_is_reloaded(tmp_path: Path) -> None:
    """kubernetes_asyncio runs the exec plugin when the config is loaded and never again by itself (DESIGN §7)."""
    async with FakeClusters(tmp_path, envs=("staging",), token_lifetime=2) as clusters:
        context = CONTEXTS["staging"]
        cfg = client.Configuration()
        loader = await config.load_kube_config(
            config_file=str(clusters.kubeconfig),
            context=context,
            client_configuration=cfg,
            persist_config=False,
        )
        async with client.ApiClient(configuration=cfg) as api:
            core = client.CoreV1Api(api)
            await core.list_namespaced_pod(NS)
            expiry = int(cfg.api_key["BearerToken"].split(".")[1])
            await asyncio.sleep(max(0.0, expiry - time.time()) + 0.1)
            with pytest.raises(ApiException) as err:
                await core.list_namespaced_pod(NS)
            assert err.value.status == 401
            assert clusters.plugin_invocations() == 1
            # Refreshing: run the plugin again and hand the new token to the live configuration.
            await loader.load_from_exec_plugin()
            cfg.api_key["BearerToken"] = loader.token
            await core.list_namespaced_pod(NS)
            assert clusters.plugin_invocations() == 2
        # Or simply build a fresh client from the kubeconfig.
        async with await config.new_client_from_config(
            config_file=str(clusters.kubeconfig), context=context, persist_config=False
        ) as api:
            await client.CoreV1Api(api).list_namespaced_pod(NS)
        assert clusters.plugin_invocations() == 3


def test_plugin_writes_exec_credential(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    env = {**os.environ, **plugin_env("k", lifetime=30, counter=counter)}
    out = subprocess.run([str(PLUGIN)], env=env, capture_output=True, check=True, timeout=10, text=True)
    cred = json.loads(out.stdout)
    assert cred["kind"] == "ExecCredential"
    assert cred["apiVersion"] == "client.authentication.k8s.io/v1beta1"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cred["status"]["expirationTimestamp"])
    assert TokenCheck("k").problem(f"Bearer {cred['status']['token']}") is None
    assert TokenCheck("other").problem(f"Bearer {cred['status']['token']}") == "bad token signature"
    assert counter.read_text().count("\n") == 1
    failed = subprocess.run(
        [str(PLUGIN)],
        env={**env, "FAKE_GKE_AUTH_FAIL": "login required"},
        capture_output=True,
        check=False,
        timeout=10,
        text=True,
    )
    assert failed.returncode == 1
    assert "login required" in failed.stderr


def test_store_errors_are_status_bodies() -> None:
    store = Store()
    with pytest.raises(StoreError) as err:
        store.delete("pods", NS, "x")
    assert err.value.status() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'pods "x" not found',
        "reason": "NotFound",
        "details": {"name": "x", "group": "", "kind": "pods"},
        "code": 404,
    }
    with pytest.raises(StoreError) as err:
        store.update("applications", NS, "x", lambda o: None)
    assert err.value.code == 404
