"""The fake API server behaves like GKE's behind Connect Gateway: TLS and the gateway path, validation and
immutability (422 Status bodies), graceful pod deletion, asynchronous garbage collection, paging, bookmarks."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.testbed.kube.apiserver import FakeKubeAPI, TokenCheck
from tests.testbed.kube.kubelet import go_duration
from tests.testbed.kube.printers import pod_status_text
from tests.testbed.kube.store import Store
from tests.testbed.kube.tls import sandbox_ca

NS = "funnelcake"
PREFIX = "/v1/projects/208318541107/locations/us-central1/gkeMemberships/gke-staging-membership"
HEADERS = {"Authorization": "Bearer static-test-token"}


@pytest.fixture
async def gke() -> AsyncIterator[tuple[FakeKubeAPI, Store]]:
    store = Store(termination_seconds=0.3, gc_delay=0.2)
    api = FakeKubeAPI(store, tokens=TokenCheck(static_tokens=("static-test-token",)), tls=True, prefix=PREFIX)
    async with api:
        yield api, store


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(ssl=sandbox_ca().client_context())
    async with aiohttp.ClientSession(connector=connector, headers=HEADERS) as session:
        yield session


def job(name: str = "migrate", **spec: Any) -> dict[str, Any]:
    template = {"spec": {"restartPolicy": "Never", "containers": [{"name": "migrate", "image": "reg/m:1"}]}}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"template": template, **spec},
    }


async def test_https_with_the_test_bed_ca_under_the_gateway_path(gke: tuple[FakeKubeAPI, Store]) -> None:
    api, _ = gke
    assert api.url.startswith("https://127.0.0.1:") and api.url.endswith(PREFIX)
    # an unknown CA is refused, as client-go would refuse it
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await plain.get(f"{api.url}/readyz")
    connector = aiohttp.TCPConnector(ssl=sandbox_ca().client_context())
    async with aiohttp.ClientSession(connector=connector) as anonymous:
        async with anonymous.get(f"{api.url}/api/v1/namespaces/{NS}/pods") as resp:
            assert resp.status == 401
        async with anonymous.get(f"{api.url}/readyz", headers=HEADERS) as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
        # outside the membership's path there is no API
        root = api.url.removesuffix(PREFIX)
        async with anonymous.get(f"{root}/api/v1/namespaces/{NS}/pods", headers=HEADERS) as resp:
            assert resp.status == 404
    assert isinstance(sandbox_ca().client_context(), ssl.SSLContext)


async def test_jobs_are_defaulted_validated_and_their_template_is_immutable(
    gke: tuple[FakeKubeAPI, Store], http: aiohttp.ClientSession
) -> None:
    api, store = gke
    url = f"{api.url}/apis/batch/v1/namespaces/{NS}/jobs"
    bad = job()
    bad["spec"]["template"]["spec"]["restartPolicy"] = "Always"
    async with http.post(url, json=bad) as resp:
        assert resp.status == 422
        status = await resp.json()
    assert (status["kind"], status["reason"], status["code"]) == ("Status", "Invalid", 422)
    assert status["details"]["causes"] == [
        {
            "reason": "FieldValueNotSupported",
            "message": 'Unsupported value: "Always": supported values: "OnFailure", "Never"',
            "field": "spec.template.spec.restartPolicy",
        }
    ]
    assert status["message"].startswith('Job.batch "migrate" is invalid: spec.template.spec.restartPolicy')
    async with http.post(url, json=job()) as resp:
        assert resp.status == 201
        created = await resp.json()
    uid = created["metadata"]["uid"]
    assert created["spec"]["backoffLimit"] == 6
    assert created["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    assert created["spec"]["template"]["metadata"]["labels"]["job-name"] == "migrate"
    changed = dict(created)
    changed["spec"] = json.loads(json.dumps(created["spec"]))
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = "reg/m:2"
    async with http.put(f"{url}/migrate", json=changed) as resp:
        assert resp.status == 422
        status = await resp.json()
    assert [c["field"] for c in status["details"]["causes"]] == ["spec.template"]
    assert status["details"]["causes"][0]["message"].endswith("field is immutable")
    # a dry run answers as a create would and stores nothing
    async with http.post(url, params={"dryRun": "All"}, json=job("dry")) as resp:
        assert resp.status == 201
    assert store.get("jobs", NS, "dry") is None


async def test_pod_deletion_is_graceful_and_garbage_collection_asynchronous(
    gke: tuple[FakeKubeAPI, Store], http: aiohttp.ClientSession
) -> None:
    api, store = gke
    owner = store.create("jobs", {**job(), "metadata": {"name": "migrate", "namespace": NS}})
    ref = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "name": "migrate",
        "uid": owner["metadata"]["uid"],
        "controller": True,
    }
    for i in range(2):
        store.create(
            "pods",
            {
                "metadata": {"name": f"migrate-{i}", "namespace": NS, "ownerReferences": [ref]},
                "spec": {"nodeName": "gke-node-1", "containers": [{"name": "migrate", "image": "reg/m:1"}]},
                "status": {"phase": "Pending"},
            },
        )
    pods = f"{api.url}/api/v1/namespaces/{NS}/pods"
    async with http.delete(f"{pods}/migrate-0") as resp:
        gone = await resp.json()
    # Terminating: still there, with the deletion stamp and the default grace period
    assert gone["metadata"]["deletionGracePeriodSeconds"] == 30
    assert store.get("pods", NS, "migrate-0")["metadata"]["deletionTimestamp"]  # type: ignore[index]
    rows = await (
        await http.get(pods, headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"})
    ).json()
    assert [r["cells"][2] for r in rows["rows"]] == ["Terminating", "Pending"]
    # the Job goes at once; its pods when the garbage collector gets to them
    async with http.delete(
        f"{api.url}/apis/batch/v1/namespaces/{NS}/jobs/migrate", params={"propagationPolicy": "Background"}
    ) as resp:
        assert resp.status == 200
    assert store.get("jobs", NS, "migrate") is None
    assert store.get("pods", NS, "migrate-1") is not None
    for _ in range(200):
        if not store.list("pods", NS)[0]:
            break
        await asyncio.sleep(0.02)
    assert store.list("pods", NS)[0] == []


async def test_foreground_deletion_keeps_the_owner_until_its_dependents_are_gone(
    gke: tuple[FakeKubeAPI, Store], http: aiohttp.ClientSession
) -> None:
    api, store = gke
    owner = store.create("jobs", {**job(), "metadata": {"name": "migrate", "namespace": NS}})
    uid = owner["metadata"]["uid"]
    ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "migrate", "uid": uid, "controller": True}
    # one pod blocks its owner's deletion (as the Job controller sets it), one does not
    for i, block in enumerate((True, False)):
        store.create(
            "pods",
            {
                "metadata": {
                    "name": f"migrate-{i}",
                    "namespace": NS,
                    "ownerReferences": [{**ref, "blockOwnerDeletion": block}],
                },
                "spec": {"nodeName": "gke-node-1", "containers": [{"name": "migrate", "image": "reg/m:1"}]},
                "status": {"phase": "Running"},
            },
        )
    url = f"{api.url}/apis/batch/v1/namespaces/{NS}/jobs/migrate"
    events = f"{api.url}/apis/batch/v1/namespaces/{NS}/jobs"
    async with http.get(events, params={"watch": "1", "fieldSelector": "metadata.name=migrate"}) as watch:
        async with http.delete(
            url, json={"kind": "DeleteOptions", "propagationPolicy": "Foreground"}
        ) as resp:
            assert resp.status == 200
            answered = await resp.json()
        # the owner is still there, marked: deletionTimestamp and the foregroundDeletion finalizer
        assert answered["metadata"]["finalizers"] == ["foregroundDeletion"]
        assert answered["metadata"]["deletionTimestamp"]
        async with http.get(url) as resp:
            assert resp.status == 200
        # its pods go Terminating once the collector gets to them, and only then does the Job go
        seen: list[tuple[str, bool]] = []
        async with asyncio.timeout(10):
            async for line in watch.content:
                event = json.loads(line)
                meta = event["object"]["metadata"]
                pods_left = [p["metadata"]["name"] for p in store.list("pods", NS)[0]]
                seen.append((event["type"], bool(pods_left)))
                if event["type"] == "DELETED":
                    assert meta["uid"] == uid
                    break
    assert seen[-1] == ("DELETED", False)  # nothing of it was left when the owner went
    assert ("MODIFIED", True) in seen  # the marking, while the pods were still there
    assert store.get("jobs", NS, "migrate") is None


async def test_lists_page_in_name_order_and_field_selectors_are_checked(
    gke: tuple[FakeKubeAPI, Store], http: aiohttp.ClientSession
) -> None:
    api, store = gke
    for name in ("c", "a", "d", "b", "e"):
        store.create("secrets", {"metadata": {"name": name, "namespace": NS}, "type": "Opaque"})
    url = f"{api.url}/api/v1/namespaces/{NS}/secrets"
    seen: list[str] = []
    params: dict[str, str] = {"limit": "2"}
    pages = 0
    while True:
        body = await (await http.get(url, params=params)).json()
        pages += 1
        seen += [i["metadata"]["name"] for i in body["items"]]
        token = body["metadata"].get("continue")
        if not token:
            break
        assert body["metadata"]["remainingItemCount"] == 5 - len(seen)
        params = {"limit": "2", "continue": token}
    assert (seen, pages) == (["a", "b", "c", "d", "e"], 3)
    async with http.get(url, params={"fieldSelector": "type=Opaque"}) as resp:
        assert resp.status == 200
    async with http.get(url, params={"fieldSelector": "data.x=1"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["message"].endswith("field label not supported: data.x")


async def test_quiet_watches_get_bookmarks(
    gke: tuple[FakeKubeAPI, Store], http: aiohttp.ClientSession
) -> None:
    api, store = gke
    api.bookmark_interval = 0.1
    store.create("secrets", {"metadata": {"name": "s", "namespace": NS}})
    params = {
        "watch": "true",
        "allowWatchBookmarks": "true",
        "resourceVersion": store.resource_version,
        "timeoutSeconds": "1",
    }
    async with http.get(f"{api.url}/api/v1/namespaces/{NS}/secrets", params=params) as resp:
        events = [json.loads(line) async for line in resp.content if line.strip()]
    assert events and {e["type"] for e in events} == {"BOOKMARK"}
    assert events[0]["object"] == {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {"resourceVersion": store.resource_version},
    }


def test_pod_status_column_reads_like_kubectls() -> None:
    def pod(status: dict[str, Any], *, inits: int = 0, deleting: bool = False) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": "p"}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {
            "metadata": meta,
            "spec": {"initContainers": [{}] * inits, "containers": [{}]},
            "status": status,
        }

    failed_init = {"state": {"terminated": {"exitCode": 128, "reason": "Error"}}}
    waiting_init = {"state": {"waiting": {"reason": "PodInitializing"}}}
    crashing = {"state": {"waiting": {"reason": "CrashLoopBackOff"}}}
    assert (
        pod_status_text(pod({"phase": "Failed", "initContainerStatuses": [failed_init]}, inits=1))
        == "Init:Error"
    )
    assert (
        pod_status_text(pod({"phase": "Pending", "initContainerStatuses": [waiting_init]}, inits=1))
        == "Init:0/1"
    )
    assert pod_status_text(pod({"phase": "Running", "containerStatuses": [crashing]})) == "CrashLoopBackOff"
    assert pod_status_text(pod({"phase": "Running"}, deleting=True)) == "Terminating"
    assert pod_status_text(pod({"phase": "Pending"})) == "Pending"
    assert go_duration(80) == "1m20s" and go_duration(300) == "5m0s" and go_duration(10) == "10s"


def test_orphaned_dependents_lose_the_owner_reference() -> None:
    store = Store()
    owner = store.create("jobs", {**job(), "metadata": {"name": "migrate", "namespace": NS}})
    ref = {"apiVersion": "batch/v1", "kind": "Job", "name": "migrate", "uid": owner["metadata"]["uid"]}
    store.create("pods", {"metadata": {"name": "p", "namespace": NS, "ownerReferences": [ref]}, "spec": {}})
    store.delete("jobs", NS, "migrate", propagation_policy="Orphan")
    pod = store.get("pods", NS, "p")
    assert pod is not None
    assert "ownerReferences" not in pod["metadata"]
