"""Real kubectl against the simulated clusters: the runbook's commands, verbatim, give a real cluster's answers.

kubectl reaches each cluster as on GKE: https checked against the kubeconfig's certificate-authority-data,
a Connect Gateway path prefix, a token from the (fake) gke-gcloud-auth-plugin exec plugin.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.testbed.gitrepos import GitOpsRemote, push_from_second_clone
from tests.testbed.kube.argocd import LAST_APPLIED, REFRESH
from tests.testbed.kube.cluster import SimCluster, SimClusters
from tests.testbed.kube.kubeconfig import CONTEXTS

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")

NS = "funnelcake"
STAGING = CONTEXTS["staging"]
PRODUCTION = CONTEXTS["production"]


@dataclass
class Result:
    rc: int
    out: str
    err: str


class Kubectl:
    """Runs the real kubectl with one kubeconfig, off the event loop the fake servers run on."""

    def __init__(self, kubeconfig: Path, home: Path) -> None:
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "KUBECONFIG": str(kubeconfig),
            "HOME": str(home),  # discovery cache under the test's own directory
        }

    async def __call__(self, *args: str, stdin: str | None = None, within: float = 60) -> Result:
        proc = await asyncio.create_subprocess_exec(
            "kubectl",
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), within)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        return Result(proc.returncode or 0, out.decode(), err.decode())

    async def ok(self, *args: str, stdin: str | None = None, within: float = 60) -> str:
        r = await self(*args, stdin=stdin, within=within)
        assert r.rc == 0, f"kubectl {' '.join(args)} failed ({r.rc}): {r.err}"
        return r.out


@pytest.fixture
async def kubectl(sim_clusters: SimClusters, tmp_path: Path) -> AsyncIterator[Kubectl]:
    path = sim_clusters.write_kubeconfig(tmp_path / "kubeconfig")
    home = tmp_path / "home"
    home.mkdir()
    yield Kubectl(path, home)
    for cluster in sim_clusters.clusters.values():
        assert cluster.errors == []


async def eventually(check: Callable[[], Awaitable[Any]], *, within: float = 10.0, what: str = "it") -> Any:
    deadline = asyncio.get_running_loop().time() + within
    last: Any = None
    while True:
        last = await check()
        if last:
            return last
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{what} not reached within {within}s; last: {last!r}")
        await asyncio.sleep(0.05)


def table(text: str) -> list[dict[str, str]]:
    """kubectl's human table as dicts (columns split on the header's two-space gaps)."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"(?:(?<=\s\s)|^)\S", header)]
    names = [header[s:e].strip() for s, e in zip(starts, [*starts[1:], None], strict=True)]
    return [
        {n: line[s:e].strip() for n, s, e in zip(names, starts, [*starts[1:], None], strict=True)}
        for line in lines[1:]
    ]


def migration_job(image: str) -> str:
    """The runbook's STAGING/POC migration Job manifest, as an operator pastes it."""
    return f"""apiVersion: batch/v1
kind: Job
metadata:
  name: funnelcake-db-migrate
  namespace: funnelcake
spec:
  ttlSecondsAfterFinished: 600
  backoffLimit: 3
  template:
    spec:
      restartPolicy: OnFailure
      containers:
      - name: migrate
        image: {image}
        args: ["up"]
        env:
        - name: CLICKHOUSE_HOST
          value: "funnelcake-funnelcake-clickhouse.funnelcake.svc.cluster.local"
        - name: CLICKHOUSE_PORT
          value: "9000"
        - name: CLICKHOUSE_USER
          valueFrom:
            secretKeyRef:
              name: funnelcake-clickhouse-credentials
              key: CLICKHOUSE_USER
        - name: CLICKHOUSE_PASSWORD
          valueFrom:
            secretKeyRef:
              name: funnelcake-clickhouse-credentials
              key: CLICKHOUSE_PASSWORD
        - name: CLICKHOUSE_DATABASE
          valueFrom:
            secretKeyRef:
              name: funnelcake-clickhouse-credentials
              key: CLICKHOUSE_DATABASE
"""


def deployed_image(cluster: SimCluster, name: str) -> str:
    dep = cluster.store.get("deployments", NS, name)
    assert dep is not None
    return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])


# ----------------------------------------------------------------------------------------- the runbook


async def test_runbook_deploy_steps_verbatim(kubectl: Kubectl, sim_clusters: SimClusters) -> None:
    staging = sim_clusters["staging"]
    # pre-flight 3: what is deployed (jsonpath), on the context the runbook names
    out = await kubectl.ok(
        "--context",
        STAGING,
        "get",
        "deployment",
        "funnelcake-relay",
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    )
    assert out == deployed_image(staging, "funnelcake-relay")

    # step 4: refresh, then sync, on the current context (production, the file's current-context)
    production = sim_clusters["production"]
    for app in ("funnelcake-api", "funnelcake-relay"):
        out = await kubectl.ok(
            "patch",
            "application",
            app,
            "-n",
            "argocd",
            "--type=merge",
            "-p",
            '{"metadata":{"annotations":{"argocd.argoproj.io/refresh":"hard"}}}',
        )
        assert out.strip() == f"application.argoproj.io/{app} patched"

    def refreshed() -> bool:
        apps = [
            production.store.get("applications", "argocd", a) or {}
            for a in ("funnelcake-api", "funnelcake-relay")
        ]
        # Argo CD consumes the annotation: it removes it once the refresh is done
        return all("argocd.argoproj.io/refresh" not in (a["metadata"].get("annotations") or {}) for a in apps)

    await eventually(lambda: asyncio.sleep(0, refreshed()), what="refresh annotation consumed")
    for app in ("funnelcake-api", "funnelcake-relay"):
        await kubectl.ok(
            "patch",
            "application",
            app,
            "-n",
            "argocd",
            "--type=merge",
            "-p",
            '{"operation":{"sync":{"revision":"HEAD"}}}',
        )
    await production.wait_for_app_state(
        {"funnelcake-api", "funnelcake-relay"}, sync="Synced", health="Healthy"
    )

    # step 5: both deployments in one rollout status
    out = await kubectl.ok(
        "rollout", "status", "deploy/funnelcake-api", "deploy/funnelcake-relay", "-n", NS, "--timeout=120s"
    )
    assert out.splitlines() == [
        'deployment "funnelcake-api" successfully rolled out',
        'deployment "funnelcake-relay" successfully rolled out',
    ]
    # step 6
    out = await kubectl.ok(
        "get",
        "deploy",
        "funnelcake-api",
        "-n",
        NS,
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    )
    assert out == deployed_image(production, "funnelcake-api")

    # staging/poc step 6: the sync patch with initiatedBy and a sync strategy
    out = await kubectl.ok(
        "--context",
        STAGING,
        "patch",
        "application",
        "funnelcake-relay",
        "-n",
        "argocd",
        "--type",
        "merge",
        "-p",
        '{"operation":{"initiatedBy":{"username":"claude"},"sync":{"syncStrategy":{"apply":{"force":false}}}}}',
    )
    assert out.strip() == "application.argoproj.io/funnelcake-relay patched"
    await staging.wait_for_app_state({"funnelcake-relay"}, sync="Synced", health="Healthy")
    relay = staging.store.get("applications", "argocd", "funnelcake-relay") or {}
    assert relay["status"]["operationState"]["operation"]["initiatedBy"]["username"] == "claude"

    # Argo CD's own printer columns
    rows = table(await kubectl.ok("--context", STAGING, "get", "applications", "-n", "argocd"))
    assert [(r["NAME"], r["SYNC STATUS"], r["HEALTH STATUS"]) for r in rows] == [
        ("funnelcake-api", "Synced", "Healthy"),
        ("funnelcake-relay", "Synced", "Healthy"),
    ]


async def test_get_pods_and_describe_show_an_image_pull_failure(
    kubectl: Kubectl, sim_clusters: SimClusters
) -> None:
    staging = sim_clusters["staging"]
    ctx = ("--context", STAGING)
    rows = table(await kubectl.ok(*ctx, "get", "pods", "-n", NS))
    assert list(rows[0]) == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert {r["STATUS"] for r in rows} == {"Running"}
    assert sorted(r["NAME"] for r in rows) == [r["NAME"] for r in rows]  # listed by name, as etcd does

    missing = staging.image_ref("funnelcake-api", "deadbee")  # never pushed to staging's registry
    out = await kubectl.ok(*ctx, "set", "image", "deploy/funnelcake-api", f"api={missing}", "-n", NS)
    assert out.strip() == "deployment.apps/funnelcake-api image updated"

    async def stuck() -> dict[str, str] | None:
        got = table(
            await kubectl.ok(*ctx, "get", "pods", "-n", NS, "-l", "app.kubernetes.io/name=funnelcake-api")
        )
        return next((r for r in got if r["STATUS"] in ("ImagePullBackOff", "ErrImagePull")), None)

    row = await eventually(stuck, what="a pod in ImagePullBackOff in kubectl get pods")
    assert row["READY"] == "0/1"
    described = await kubectl.ok(*ctx, "describe", "pod", row["NAME"], "-n", NS)
    assert f"Image:          {missing}" in described
    assert re.search(r"Warning\s+Failed\s+.*Failed to pull image \"" + re.escape(missing), described)
    assert "Controlled By:  ReplicaSet/funnelcake-api-" in described

    # the rollout is stuck: once the progress deadline passes, rollout status says so and fails
    def deadline_exceeded() -> bool:
        dep = staging.store.get("deployments", NS, "funnelcake-api") or {}
        conds = {c["type"]: c for c in (dep.get("status") or {}).get("conditions") or []}
        return conds.get("Progressing", {}).get("reason") == "ProgressDeadlineExceeded"

    await eventually(lambda: asyncio.sleep(0, deadline_exceeded()), what="ProgressDeadlineExceeded")
    r = await kubectl(*ctx, "rollout", "status", "deploy/funnelcake-api", "-n", NS, "--timeout=10s")
    assert (r.rc, r.err) == (1, 'error: deployment "funnelcake-api" exceeded its progress deadline\n')


async def test_runbook_migration_job_verbatim(kubectl: Kubectl, sim_clusters: SimClusters) -> None:
    staging = sim_clusters["staging"]
    ctx = ("--context", STAGING)
    tag = deployed_image(staging, "funnelcake-api").rsplit(":", 1)[1]
    image = staging.image_ref("funnelcake-migrate", tag)

    r = await kubectl(*ctx, "delete", "job", "funnelcake-db-migrate", "-n", NS, "--ignore-not-found")
    assert (r.rc, r.out, r.err) == (0, "", "")
    out = await kubectl.ok(*ctx, "apply", "-f", "-", stdin=migration_job(image))
    assert out.strip() == "job.batch/funnelcake-db-migrate created"
    await kubectl.ok(
        *ctx, "wait", "--for=condition=complete", "job/funnelcake-db-migrate", "-n", NS, "--timeout=30s"
    )
    logs = await kubectl.ok(*ctx, "logs", "job/funnelcake-db-migrate", "-n", NS)
    (pod,) = [
        p
        for p in staging.store.list("pods", NS, label_selector="job-name=funnelcake-db-migrate")[0]
        if not p["metadata"].get("deletionTimestamp")
    ]
    assert logs == staging.store.get_log(NS, pod["metadata"]["name"], "migrate")
    assert logs  # golang-migrate said something
    rows = table(await kubectl.ok(*ctx, "get", "jobs", "-n", NS))
    assert [(r["NAME"], r["STATUS"], r["COMPLETIONS"]) for r in rows] == [
        ("funnelcake-db-migrate", "Complete", "1/1")
    ]

    # the same manifest again changes nothing; another image is refused: a Job's template is immutable
    out = await kubectl.ok(*ctx, "apply", "-f", "-", stdin=migration_job(image))
    assert out.strip() == "job.batch/funnelcake-db-migrate unchanged"
    r = await kubectl(*ctx, "apply", "-f", "-", stdin=migration_job(image + "0"))
    assert r.rc == 1
    assert 'The Job "funnelcake-db-migrate" is invalid: spec.template: Invalid value:' in r.err
    assert "field is immutable" in r.err
    # a typo in the manifest is caught by server-side field validation, as kubectl's default is Strict
    r = await kubectl(
        *ctx, "apply", "-f", "-", stdin=migration_job(image).replace("backoffLimit", "backofLimit")
    )
    assert r.rc == 1
    assert 'unknown field "spec.backofLimit"' in r.err

    out = await kubectl.ok(*ctx, "delete", "job", "funnelcake-db-migrate", "-n", NS, "--ignore-not-found")
    assert out.strip() == 'job.batch "funnelcake-db-migrate" deleted'


# ---------------------------------------------------------------------------------- beyond the runbook


async def test_discovery_explain_history_selectors_and_patches(
    kubectl: Kubectl, sim_clusters: SimClusters
) -> None:
    staging = sim_clusters["staging"]
    ctx = ("--context", STAGING)
    resources = {r["NAME"]: r for r in table(await kubectl.ok(*ctx, "api-resources"))}
    assert resources["deployments"]["SHORTNAMES"] == "deploy"
    assert resources["pods"]["SHORTNAMES"] == "po"
    assert resources["applications"]["SHORTNAMES"] == "app,apps"
    assert resources["namespaces"]["NAMESPACED"] == "false"

    explained = await kubectl.ok(*ctx, "explain", "job.spec.backoffLimit")
    assert "KIND:       Job" in explained
    assert "FIELD: backoffLimit <integer>" in explained
    assert "Specifies the number of retries before marking this job failed." in explained
    assert "containers\t<[]Container> -required-" in await kubectl.ok(
        *ctx, "explain", "deployment.spec.template.spec"
    )

    # a new image is a new ReplicaSet revision; undo goes back to the first
    first = deployed_image(staging, "funnelcake-api")
    second = first.rsplit(":", 1)[0] + ":" + "0" * 7
    await kubectl.ok(*ctx, "set", "image", "deployment/funnelcake-api", f"api={second}", "-n", NS)
    history = await kubectl.ok(*ctx, "rollout", "history", "deploy/funnelcake-api", "-n", NS)
    assert [line.split()[0] for line in history.splitlines()[2:] if line.strip()] == ["1", "2"]
    out = await kubectl.ok(*ctx, "rollout", "undo", "deploy/funnelcake-api", "-n", NS)
    assert out.strip() == "deployment.apps/funnelcake-api rolled back"
    assert deployed_image(staging, "funnelcake-api") == first
    await kubectl.ok(*ctx, "rollout", "status", "deploy/funnelcake-api", "-n", NS, "--timeout=30s")

    # selectors: labels any way, fields only those the server supports
    names = await kubectl.ok(
        *ctx, "get", "pods", "-n", NS, "-l", "app.kubernetes.io/name in (funnelcake-relay)", "-o", "name"
    )
    assert names and all(n.startswith("pod/funnelcake-relay-") for n in names.split())
    running = await kubectl.ok(
        *ctx, "get", "pods", "-n", NS, "--field-selector", "status.phase=Running", "-o", "name"
    )
    assert len(running.split()) >= 4
    r = await kubectl(*ctx, "get", "pods", "-n", NS, "--field-selector", "spec.containers=x")
    assert r.rc == 1
    assert "field label not supported: spec.containers" in r.err

    # the three patch types, and a dry run that stores nothing
    await kubectl.ok(
        *ctx,
        "patch",
        "deploy",
        "funnelcake-relay",
        "-n",
        NS,
        "-p",
        '{"spec":{"template":{"spec":{"containers":[{"name":"relay","env":[{"name":"LOG_LEVEL","value":"debug"}]}]}}}}',
    )
    relay = staging.store.get("deployments", NS, "funnelcake-relay") or {}
    containers = relay["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 2  # strategic merge: merged by name, the sidecar kept
    assert {"name": "LOG_LEVEL", "value": "debug"} in containers[0]["env"]
    await kubectl.ok(
        *ctx,
        "patch",
        "deploy",
        "funnelcake-relay",
        "-n",
        NS,
        "--type=json",
        "-p",
        '[{"op":"replace","path":"/spec/replicas","value":3}]',
    )
    await kubectl.ok(
        *ctx,
        "patch",
        "deploy",
        "funnelcake-relay",
        "-n",
        NS,
        "--type=merge",
        "-p",
        '{"metadata":{"labels":{"team":"relay"}}}',
    )
    relay = staging.store.get("deployments", NS, "funnelcake-relay") or {}
    assert relay["spec"]["replicas"] == 3
    assert relay["metadata"]["labels"]["team"] == "relay"
    out = await kubectl.ok(
        *ctx, "scale", "deploy/funnelcake-relay", "--replicas=1", "-n", NS, "--dry-run=server"
    )
    assert out.strip() == "deployment.apps/funnelcake-relay scaled (server dry run)"
    assert (staging.store.get("deployments", NS, "funnelcake-relay") or {})["spec"]["replicas"] == 3
    assert (await kubectl.ok(*ctx, "auth", "can-i", "delete", "jobs", "-n", NS)).strip() == "yes"

    # a watch prints the table once, then a row per change
    watch = await asyncio.create_subprocess_exec(
        "kubectl",
        *ctx,
        "get",
        "deploy",
        "funnelcake-relay",
        "-n",
        NS,
        "-w",
        "--output-watch-events",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=kubectl.env,
    )
    try:
        assert watch.stdout is not None
        header = (await asyncio.wait_for(watch.stdout.readline(), 30)).decode()
        assert header.split() == ["EVENT", "NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
        first_row = (await asyncio.wait_for(watch.stdout.readline(), 30)).decode()
        assert first_row.split()[:2] == ["ADDED", "funnelcake-relay"]
        await kubectl.ok(*ctx, "scale", "deploy/funnelcake-relay", "--replicas=2", "-n", NS)
        changed = (await asyncio.wait_for(watch.stdout.readline(), 30)).decode()
        assert changed.split()[:2] == ["MODIFIED", "funnelcake-relay"]
    finally:
        watch.kill()
        await watch.wait()
    assert json.loads(await kubectl.ok(*ctx, "get", "ns", NS, "-o", "json"))["status"]["phase"] == "Active"


async def test_argo_cd_diffs_the_whole_render_and_a_sync_reverts_hand_changes(
    kubectl: Kubectl, sim_clusters: SimClusters
) -> None:
    staging = sim_clusters["staging"]
    ctx = ("--context", STAGING)

    def sync_status(app: str) -> str:
        obj = staging.store.get("applications", "argocd", app) or {}
        return str(((obj.get("status") or {}).get("sync") or {}).get("status"))

    await kubectl.ok(*ctx, "scale", "deploy/funnelcake-api", "--replicas=3", "-n", NS)
    await kubectl.ok(
        *ctx,
        "patch",
        "deploy",
        "funnelcake-relay",
        "-n",
        NS,
        "--type=json",
        "-p",
        '[{"op":"replace","path":"/spec/template/spec/containers/0/envFrom/0/secretRef/name","value":"other"}]',
    )
    # neither change touches an image; both are drift from what git renders
    await eventually(
        lambda: asyncio.sleep(
            0, sync_status("funnelcake-api") == sync_status("funnelcake-relay") == "OutOfSync"
        ),
        what="OutOfSync on both",
    )
    rows = table(await kubectl.ok(*ctx, "get", "applications", "-n", "argocd"))
    assert {r["SYNC STATUS"] for r in rows} == {"OutOfSync"}
    for app in ("funnelcake-api", "funnelcake-relay"):
        await kubectl.ok(
            *ctx,
            "patch",
            "application",
            app,
            "-n",
            "argocd",
            "--type=merge",
            "-p",
            '{"operation":{"sync":{}}}',
        )
    await staging.wait_for_app_state({"funnelcake-api", "funnelcake-relay"}, sync="Synced", health="Healthy")
    api = staging.store.get("deployments", NS, "funnelcake-api") or {}
    relay = staging.store.get("deployments", NS, "funnelcake-relay") or {}
    assert api["spec"]["replicas"] == 2  # what git says
    assert relay["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"secretRef": {"name": "funnelcake-clickhouse-credentials"}}
    ]


async def test_argo_cd_diffs_three_ways_like_kubectl_apply(
    kubectl: Kubectl, sim_clusters: SimClusters, sim_gitops: GitOpsRemote
) -> None:
    """Argo CD's client-side diff (argoproj/argo-cd#19548, #4661): a field only someone else ever set is not
    drift and survives a sync; a field the last sync applied and git has since dropped is drift, and the
    next sync deletes it."""
    staging = sim_clusters["staging"]
    ctx = ("--context", STAGING)
    app = "funnelcake-api"

    async def hard_refresh() -> str:
        await kubectl.ok(
            *ctx, "annotate", "application", app, "-n", "argocd", "--overwrite", f"{REFRESH}=hard"
        )

        async def consumed() -> bool:
            obj = staging.store.get("applications", "argocd", app) or {}
            return REFRESH not in (obj["metadata"].get("annotations") or {})

        await eventually(consumed, what="the refresh consumed")
        obj = staging.store.get("applications", "argocd", app) or {}
        return str(obj["status"]["sync"]["status"])

    live = json.loads(await kubectl.ok(*ctx, "get", "deploy", app, "-n", NS, "-o", "json"))
    last = json.loads(live["metadata"]["annotations"][LAST_APPLIED])  # what the sync applied, as sent
    assert last["metadata"]["labels"]["app.kubernetes.io/part-of"] == "funnelcake"
    assert "strategy" not in last["spec"]  # the server's defaults are not in it

    # by hand: an env var and a label git never had — not drift, Synced stays
    await kubectl.ok(*ctx, "set", "env", f"deploy/{app}", "-n", NS, "HAND_ADDED=1")
    await kubectl.ok(*ctx, "label", "deploy", app, "-n", NS, "owner=alice")
    assert await hard_refresh() == "Synced"

    # git drops a label the last sync applied: now it is drift
    base = f"k8s/applications/{app}/base/deployment.yaml"
    await asyncio.to_thread(
        push_from_second_clone,
        sim_gitops.url,
        base,
        lambda text: text.replace("    app.kubernetes.io/part-of: funnelcake\n", "", 1),
        "api: drop the part-of label",
    )
    assert await hard_refresh() == "OutOfSync"
    await kubectl.ok(
        *ctx, "patch", "application", app, "-n", "argocd", "--type=merge", "-p", '{"operation":{"sync":{}}}'
    )
    await staging.wait_for_app_state({app}, sync="Synced", health="Healthy")
    after = json.loads(await kubectl.ok(*ctx, "get", "deploy", app, "-n", NS, "-o", "json"))
    labels = after["metadata"]["labels"]
    assert "app.kubernetes.io/part-of" not in labels  # deleted by the three-way merge
    assert labels["owner"] == "alice"  # kept: never applied by Argo CD
    env = {e["name"]: e.get("value") for e in after["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HAND_ADDED"] == "1"
    applied = json.loads(after["metadata"]["annotations"][LAST_APPLIED])
    assert "app.kubernetes.io/part-of" not in applied["metadata"]["labels"]


async def test_kubectl_delete_cascade_foreground_returns_once_the_dependents_are_gone(
    kubectl: Kubectl, sim_clusters: SimClusters
) -> None:
    staging = sim_clusters["staging"]
    ctx = ("--context", STAGING)
    selector = "app.kubernetes.io/name=funnelcake-relay"
    assert staging.store.list("pods", NS, label_selector=selector)[0]
    # kubectl waits (--wait is the default) until the Deployment itself is gone, which in the foreground
    # is only after its ReplicaSets, and their pods, are
    out = await kubectl.ok(*ctx, "delete", "deploy", "funnelcake-relay", "-n", NS, "--cascade=foreground")
    assert out.strip() == 'deployment.apps "funnelcake-relay" deleted'
    assert staging.store.get("deployments", NS, "funnelcake-relay") is None
    assert staging.store.list("pods", NS, label_selector=selector)[0] == []
    assert [
        rs
        for rs in staging.store.list("replicasets", NS)[0]
        if rs["metadata"]["name"].startswith("funnelcake-relay-")
    ] == []
