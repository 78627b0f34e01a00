"""Benchmark of the fake Kubernetes API server: throughput, and whether it degrades as requests pile up."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

import aiohttp

# Run as `.venv/bin/python bench/fakekube.py` from anywhere: the test bed lives in the repository, not the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.testbed.kube.apiserver import FakeKubeAPI
from tests.testbed.kube.store import Store

TOTAL = 5000
WINDOW = 500
CONCURRENCY = 8
NS = "funnelcake"
APPS = ("funnelcake-api", "funnelcake-relay")


def seed(store: Store) -> None:
    """A cluster shaped like one environment: the two Deployments, their pods, events, a migration Job."""
    for app in APPS:
        store.create(
            "deployments",
            {
                "metadata": {"name": app, "namespace": NS, "labels": {"app": app}},
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": {"app": app}},
                    "template": {
                        # valid as a real server requires: the template carries the selector's labels
                        "metadata": {"labels": {"app": app}},
                        "spec": {"containers": [{"name": "main", "image": f"reg/{app}:abc1234"}]},
                    },
                },
            },
        )
        for i in range(3):
            pod = f"{app}-{i}"
            store.create(
                "pods",
                {
                    "metadata": {"name": pod, "namespace": NS, "labels": {"app": app}},
                    "spec": {"containers": [{"name": "main", "image": f"reg/{app}:abc1234"}]},
                },
            )
            store.create(
                "events",
                {
                    "metadata": {"name": f"{pod}.pulled", "namespace": NS},
                    "involvedObject": {"kind": "Pod", "name": pod, "namespace": NS},
                    "reason": "Pulled",
                    "message": f'Successfully pulled image "reg/{app}:abc1234"',
                },
            )
    store.create(
        "jobs", {"metadata": {"name": "funnelcake-db-migrate", "namespace": NS}, "spec": {"backoffLimit": 3}}
    )
    store.create(
        "applications",
        {"metadata": {"name": "funnelcake-api", "namespace": "argocd"}, "spec": {"project": "default"}},
    )


def plan(rng: random.Random) -> list[tuple[str, str, dict[str, str], object, str | None]]:
    """The request mix a deploy produces: mostly reads and polls, some patches (method, path, query, body, type)."""
    out: list[tuple[str, str, dict[str, str], object, str | None]] = []
    for i in range(TOTAL):
        app = APPS[i % 2]
        roll = rng.random()
        if roll < 0.40:
            out.append(("GET", f"/apis/apps/v1/namespaces/{NS}/deployments/{app}", {}, None, None))
        elif roll < 0.55:
            out.append(("GET", f"/api/v1/namespaces/{NS}/pods", {"labelSelector": f"app={app}"}, None, None))
        elif roll < 0.65:
            pod = f"{app}-{rng.randrange(3)}"
            out.append(
                (
                    "GET",
                    f"/api/v1/namespaces/{NS}/events",
                    {"fieldSelector": f"involvedObject.name={pod},involvedObject.kind=Pod"},
                    None,
                    None,
                )
            )
        elif roll < 0.75:
            out.append(
                (
                    "GET",
                    "/apis/argoproj.io/v1alpha1/namespaces/argocd/applications/funnelcake-api",
                    {},
                    None,
                    None,
                )
            )
        elif roll < 0.85:
            body = {"metadata": {"annotations": {"bench/iteration": str(i)}}}
            out.append(
                (
                    "PATCH",
                    "/apis/argoproj.io/v1alpha1/namespaces/argocd/applications/funnelcake-api",
                    {},
                    body,
                    "application/merge-patch+json",
                )
            )
        elif roll < 0.95:
            body = {
                "spec": {
                    "template": {"spec": {"containers": [{"name": "main", "image": f"reg/{app}:{i:07x}"}]}}
                }
            }
            out.append(
                (
                    "PATCH",
                    f"/apis/apps/v1/namespaces/{NS}/deployments/{app}",
                    {},
                    body,
                    "application/strategic-merge-patch+json",
                )
            )
        else:
            body = {"status": {"observedGeneration": i, "replicas": 3}}
            out.append(
                (
                    "PATCH",
                    f"/apis/apps/v1/namespaces/{NS}/deployments/{app}/status",
                    {},
                    body,
                    "application/merge-patch+json",
                )
            )
    return out


async def run() -> tuple[float, float, float]:
    store = Store()
    seed(store)
    requests = plan(random.Random(7))
    done: list[float] = []
    async with FakeKubeAPI(store) as server:
        timeout = aiohttp.ClientTimeout(total=10)
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(base_url=server.url, timeout=timeout, connector=connector) as http:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(TOTAL):
                queue.put_nowait(i)

            async def worker() -> None:
                while True:
                    try:
                        i = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    method, path, params, body, ctype = requests[i]
                    headers = {"Content-Type": ctype} if ctype else {}
                    async with http.request(method, path, params=params, json=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"{method} {path} -> {resp.status}: {await resp.text()}")
                    done.append(time.perf_counter())

            start = time.perf_counter()
            workers = [asyncio.create_task(worker(), name=f"bench-worker-{n}") for n in range(CONCURRENCY)]
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
    assert len(done) == TOTAL
    rps_first = WINDOW / (done[WINDOW - 1] - start)
    rps_last = WINDOW / (done[-1] - done[-WINDOW - 1])
    return rps_first, rps_last, TOTAL / (done[-1] - start)


def main() -> None:
    rps_first, rps_last, overall = asyncio.run(run())
    print(f"{TOTAL} requests, concurrency {CONCURRENCY}, overall {overall:.0f} req/s")
    print(f"fakekube rps_first={rps_first:.0f} rps_last={rps_last:.0f}")


if __name__ == "__main__":
    main()
