"""Simulated Argo CD application controller for the funnelcake Applications.

It reads the GitOps bare remote with real git, renders the env overlay with `kubectl kustomize`, and
writes the whole Application (no status subresource): a `refresh` annotation is consumed together with
a newer `status.reconciledAt`. Sync status is a diff of everything the render sets against the live
Deployment (a hand-made replicas or env change is OutOfSync); an `operation` becomes `operationState`
Running, the whole rendered Deployment is applied (reverting such changes), then ONE write sets the final phase, finishedAt, syncResult.revision and
removes `operation` — which is also why an `operation` patched while one is Running is silently lost.

The diff is Argo CD's client-side three-way diff, as `kubectl apply` does it: a field set by hand that
the render does not have (an extra env var, a label) is neither drift nor removed by a sync
(argoproj/argo-cd#19548, #4661: "expected behaviour"); a field the last applied manifest had (the
`kubectl.kubernetes.io/last-applied-configuration` annotation a sync writes) and the render no longer
has is drift, and a sync deletes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tests.testbed.kube import admission
from tests.testbed.kube.controller import KeyedWorker, now_rfc3339, strictly_after

if TYPE_CHECKING:
    from tests.testbed.kube.controller import StoreView, Supervisor, Timings

log = logging.getLogger("testbed.kube.argocd")

REFRESH = "argocd.argoproj.io/refresh"
TRACKING_LABEL = "app.kubernetes.io/instance"
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


class CommandError(Exception):
    """A git/kubectl command failed; the message is its stderr, as Argo CD would surface it."""


async def run(*args: str, limit: float, cwd: Path | None = None) -> bytes:
    """Run a command off the event loop (no shell) and return stdout; CommandError on failure/timeout."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise CommandError(err.decode(errors="replace").strip() or f"{args[0]} exited {proc.returncode}")
    return out


class GitMirror:
    """A bare mirror of a remote (like Argo CD's repo-server cache), read with plumbing commands."""

    def __init__(self, url: str, path: Path, *, timeout: float) -> None:
        self.url = url
        self.path = path
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._trees: dict[str, Path] = {}

    async def _git(self, *args: str) -> bytes:
        return await run("git", f"--git-dir={self.path}", *args, limit=self.timeout)

    async def fetch(self) -> None:
        async with self._lock:
            if not (self.path / "HEAD").exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
                await run("git", "clone", "--quiet", "--bare", self.url, str(self.path), limit=self.timeout)
                return
            await self._git(
                "fetch",
                "--quiet",
                "--prune",
                "--force",
                "origin",
                "+refs/heads/*:refs/heads/*",
                "+refs/tags/*:refs/tags/*",
            )

    async def resolve(self, rev: str) -> str:
        """A full sha for a branch, tag or (short) sha; CommandError saying why not."""
        try:
            out = await self._git("rev-parse", "--verify", "--end-of-options", f"{rev}^{{commit}}")
        except CommandError as e:
            raise CommandError(f"unable to resolve '{rev}' to a commit SHA: {e}") from None
        return out.decode().strip()

    async def ls(self, sha: str, directory: str) -> list[str]:
        out = await self._git("ls-tree", "--name-only", sha, f"{directory.rstrip('/')}/")
        return [line for line in out.decode().splitlines() if line]

    async def show(self, sha: str, path: str) -> str:
        return (await self._git("show", f"{sha}:{path}")).decode(errors="replace")

    async def tree(self, sha: str) -> Path:
        """The commit's files extracted once into a cache directory (git archive, no index involved)."""
        async with self._lock:
            cached = self._trees.get(sha)
            if cached is not None:
                return cached
            data = await self._git("archive", "--format=tar", sha)
            dest = self.path.parent / f"tree-{self.path.stem}-{sha[:12]}"

            def extract() -> None:
                shutil.rmtree(dest, ignore_errors=True)
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    tar.extractall(dest, filter="data")

            await asyncio.to_thread(extract)
            self._trees[sha] = dest
            return dest


class Rendered:
    """What a render of one overlay at one revision produced (the Deployment is what we compare)."""

    def __init__(self, revision: str, deployment: dict[str, Any]) -> None:
        self.revision = revision
        self.deployment = deployment

    @property
    def name(self) -> str:
        return str(self.deployment["metadata"]["name"])

    @property
    def namespace(self) -> str | None:
        ns = self.deployment["metadata"].get("namespace")
        return str(ns) if ns else None

    def images(self) -> dict[str, str]:
        return _images(self.deployment)


def _keyed(items: list[Any]) -> dict[str, Any] | None:
    """A list of named objects (containers, env, ports by name) as a dict, else None."""
    if items and all(isinstance(i, dict) and "name" in i for i in items):
        return {str(i["name"]): i for i in items}
    return None


def drift(desired: Any, live: Any, path: str = "") -> list[str]:
    """Where `live` differs from `desired`, field by field over everything the render sets.

    Fields only the live object has (defaults, status, controller annotations) are not drift, as in
    Argo CD's normalised diff; a rendered field with another live value, or missing, is.
    """
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return [path or "."]
        out: list[str] = []
        for key, want in desired.items():
            out += drift(want, live.get(key), f"{path}.{key}")
        return out
    if isinstance(desired, list):
        if not isinstance(live, list):
            return [path]
        want_by, have_by = _keyed(desired), _keyed(live)
        if want_by is not None and have_by is not None:
            # merged by name, like a strategic merge: an entry someone else added is theirs, not drift
            return [
                d
                for k, v in want_by.items()
                for d in (drift(v, have_by[k], f"{path}[{k}]") if k in have_by else [f"{path}[{k}]"])
            ]
        if len(live) != len(desired):
            return [path]
        return [
            d for i, (w, h) in enumerate(zip(desired, live, strict=True)) for d in drift(w, h, f"{path}[{i}]")
        ]
    return [] if desired == live or str(desired) == str(live) else [path]


def removed(last: Any, desired: Any, live: Any, path: str = "") -> tuple[list[str], Any]:
    """The three-way part of the diff: fields the last applied manifest set, the render no longer sets,
    and the live object still has; with `live` without them (what `kubectl apply` makes of it)."""
    if isinstance(last, dict) and isinstance(live, dict):
        want = desired if isinstance(desired, dict) else {}
        paths: list[str] = []
        out = dict(live)
        for key, was in last.items():
            if key not in live:
                continue
            if key not in want:
                paths.append(f"{path}.{key}")
                del out[key]
            else:
                sub, out[key] = removed(was, want[key], live[key], f"{path}.{key}")
                paths += sub
        return paths, out
    if isinstance(last, list) and isinstance(live, list):
        last_by, have_by = _keyed(last), _keyed(live)
        if last_by is None or have_by is None:
            return [], live  # a plain list is replaced whole by the apply: the two-way diff covers it
        want_by = (_keyed(desired) if isinstance(desired, list) else None) or {}
        paths, gone, kept = [], set(), {}
        for k, was in last_by.items():
            if k not in have_by:
                continue
            if k not in want_by:
                paths.append(f"{path}[{k}]")
                gone.add(k)
            else:
                sub, kept[k] = removed(was, want_by[k], have_by[k], f"{path}[{k}]")
                paths += sub
        return paths, [kept.get(str(i["name"]), i) for i in live if str(i["name"]) not in gone]
    return [], live


def last_applied(live: dict[str, Any] | None) -> dict[str, Any] | None:
    """The manifest the last sync applied, from the live object's annotation."""
    text = (((live or {}).get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    if not text:
        return None
    with contextlib.suppress(ValueError):
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    return None


def out_of_sync(desired: dict[str, Any], live: dict[str, Any]) -> list[str]:
    """Every difference Argo CD's diff shows: rendered fields changed or missing, and fields the last
    sync applied that the render dropped; never fields only someone else ever set."""
    gone, _ = removed(last_applied(live), desired, live)
    return drift(desired, live) + gone


def merge_desired(live: Any, desired: Any) -> Any:
    """`live` with every rendered field set back to its rendered value; live-only fields kept."""
    if isinstance(desired, dict) and isinstance(live, dict):
        return {**live, **{k: merge_desired(live.get(k), v) for k, v in desired.items()}}
    if isinstance(desired, list) and isinstance(live, list):
        want_by, have_by = _keyed(desired), _keyed(live)
        if want_by is not None and have_by is not None:
            merged = [merge_desired(have_by.get(k), v) for k, v in want_by.items()]
            return merged + [v for k, v in have_by.items() if k not in want_by]
        return [merge_desired(h, w) for w, h in zip(desired, live, strict=False)] + desired[len(live) :]
    return desired


def _images(deployment: dict[str, Any] | None) -> dict[str, str]:
    if deployment is None:
        return {}
    spec = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    return {c["name"]: c.get("image", "") for c in spec.get("containers") or []}


def deployment_health(dep: dict[str, Any] | None) -> tuple[str, str]:
    """Argo CD's built-in health check for a Deployment: (status, message)."""
    if dep is None:
        return "Missing", ""
    spec, status = dep.get("spec") or {}, dep.get("status") or {}
    name = dep["metadata"]["name"]
    if int(dep["metadata"].get("generation", 1)) > int(status.get("observedGeneration", 0)):
        return (
            "Progressing",
            "Waiting for rollout to finish: observed deployment generation less than desired generation",
        )
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "Degraded", f'Deployment "{name}" exceeded its progress deadline'
    replicas = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas", 0))
    total = int(status.get("replicas", 0))
    available = int(status.get("availableReplicas", 0))
    if updated < replicas:
        return "Progressing", (
            f"Waiting for rollout to finish: {updated} out of {replicas} new replicas have been updated..."
        )
    if total > updated:
        return "Progressing", (
            f"Waiting for rollout to finish: {total - updated} old replicas are pending termination..."
        )
    if available < updated:
        return "Progressing", (
            f"Waiting for rollout to finish: {available} of {updated} updated replicas are available..."
        )
    return "Healthy", ""


class ArgoCD:
    """Reconciles every Application of the cluster against the one GitOps repository."""

    def __init__(
        self, store: StoreView, sup: Supervisor, timings: Timings, *, gitops_url: str, work_dir: Path
    ) -> None:
        self.store = store
        self.sup = sup
        self.timings = timings
        self.gitops_url = gitops_url
        self.mirror = GitMirror(
            gitops_url, Path(work_dir) / "argocd-repo.git", timeout=timings.subprocess_timeout
        )
        self.worker = KeyedWorker(sup, "application", self.reconcile)
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._syncing: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._rendered: dict[tuple[str, str], Rendered] = {}
        self._render_cache: dict[tuple[str, str], Rendered] = {}
        # live Deployment (namespace, name) -> the Applications that manage it
        self._targets: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self.refreshes = 0  # completed refreshes (tests)

    async def start(self) -> None:
        await self.mirror.fetch()

    def _lock(self, key: tuple[str, str]) -> asyncio.Lock:
        return self._locks.setdefault(key, asyncio.Lock())

    # ---------------------------------------------------------------------------------- dispatch

    async def reconcile(self, key: tuple[str, str]) -> None:
        app = await self.store.get("applications", *key)
        if app is None:
            return
        op = app.get("operation")
        phase = ((app.get("status") or {}).get("operationState") or {}).get("phase")
        if op and key not in self._syncing and phase != "Running":
            self._syncing[key] = self.sup.spawn(f"argocd-sync/{key[1]}", self._sync(key))
        if (app["metadata"].get("annotations") or {}).get(REFRESH) is not None:
            await asyncio.sleep(self.timings.argo_reconcile)
            await self.refresh(key)

    def deployment_changed(self, dep_key: tuple[str, str]) -> None:
        for app_key in self._targets.get(dep_key, ()):
            self.sup.spawn(f"argocd-health/{app_key[1]}", self._health_only(app_key))

    # ------------------------------------------------------------------------------------ render

    async def render(self, app: dict[str, Any], revision: str | None = None) -> Rendered:
        """Resolve the revision (after a fetch) and render the app's path there; cached per sha."""
        source = (app.get("spec") or {}).get("source") or {}
        rev = revision or source.get("targetRevision") or "HEAD"
        path = str(source.get("path", "")).strip("/")
        await self.mirror.fetch()
        sha = await self.mirror.resolve(rev)
        cached = self._render_cache.get((sha, path))
        if cached is not None:
            return cached
        root = await self.mirror.tree(sha)
        if not (root / path).is_dir():
            raise CommandError(f"app path does not exist: {path}")
        out = await run("kubectl", "kustomize", str(root / path), limit=self.timings.subprocess_timeout)
        docs = [d for d in yaml.safe_load_all(out.decode()) if isinstance(d, dict)]
        dep = next((d for d in docs if d.get("kind") == "Deployment"), None)
        if dep is None:
            raise CommandError(f"{path} at {sha[:7]} renders no Deployment")
        rendered = Rendered(sha, dep)
        self._render_cache[(sha, path)] = rendered
        return rendered

    def _target_key(self, app: dict[str, Any], rendered: Rendered) -> tuple[str, str]:
        dest_ns = ((app.get("spec") or {}).get("destination") or {}).get("namespace")
        return (rendered.namespace or dest_ns or "default", rendered.name)

    # ----------------------------------------------------------------------------------- refresh

    async def refresh(self, key: tuple[str, str]) -> None:
        async with self._lock(key):
            app = await self.store.get("applications", *key)
            if app is None:
                return
            try:
                rendered = await self.render(app)
            except CommandError as e:
                await self._write_comparison_error(key, str(e))
                return
            await self._write_refresh(key, app, rendered, consume=True)

    async def _write_comparison_error(self, key: tuple[str, str], message: str) -> None:
        def put(obj: dict[str, Any]) -> None:
            status = obj.setdefault("status", {})
            status["sync"] = {**(status.get("sync") or {}), "status": "Unknown"}
            status["conditions"] = [
                {
                    "type": "ComparisonError",
                    "message": f"Failed to load target state: {message}",
                    "lastTransitionTime": now_rfc3339(),
                }
            ]
            status["reconciledAt"] = strictly_after(status.get("reconciledAt"))
            (obj["metadata"].get("annotations") or {}).pop(REFRESH, None)

        await self.store.update("applications", key[0], key[1], put)
        self.refreshes += 1

    async def _write_refresh(
        self, key: tuple[str, str], app: dict[str, Any], rendered: Rendered, *, consume: bool
    ) -> None:
        target = self._target_key(app, rendered)
        self._rendered[key] = rendered
        self._targets.setdefault(target, set()).add(key)
        live = await self.store.get("deployments", *target)
        desired = self._desired(app, rendered)
        sync_status = "Synced" if live is not None and not out_of_sync(desired, live) else "OutOfSync"
        health, message = deployment_health(live)
        source = (app.get("spec") or {}).get("source") or {}
        destination = (app.get("spec") or {}).get("destination") or {}

        def put(obj: dict[str, Any]) -> None:
            status = obj.setdefault("status", {})
            status["sync"] = {
                "status": sync_status,
                "revision": rendered.revision,
                "comparedTo": {"source": source, "destination": destination},
            }
            status["health"] = {"status": health, **({"message": message} if message else {})}
            status["resources"] = [
                {
                    "group": "apps",
                    "version": "v1",
                    "kind": "Deployment",
                    "namespace": target[0],
                    "name": target[1],
                    "status": sync_status,
                    "health": {"status": health, **({"message": message} if message else {})},
                }
            ]
            status["summary"] = {"images": sorted(set(_images(live).values()))}
            status["sourceType"] = "Kustomize"
            status.pop("conditions", None)
            if consume:
                status["reconciledAt"] = strictly_after(status.get("reconciledAt"))
                annotations = obj["metadata"].get("annotations") or {}
                annotations.pop(REFRESH, None)
                if not annotations:
                    obj["metadata"].pop("annotations", None)

        await self.store.update("applications", key[0], key[1], put)
        if consume:
            self.refreshes += 1

    async def _health_only(self, key: tuple[str, str]) -> None:
        """A managed resource changed: recompute sync/health against the last render (no git)."""
        async with self._lock(key):
            rendered = self._rendered.get(key)
            app = await self.store.get("applications", *key)
            if rendered is None or app is None:
                return
            if (app["metadata"].get("annotations") or {}).get(REFRESH) is not None:
                return  # the pending refresh will write it
            await self._write_refresh(key, app, rendered, consume=False)

    # -------------------------------------------------------------------------------------- sync

    async def _sync(self, key: tuple[str, str]) -> None:
        try:
            await asyncio.sleep(self.timings.argo_reconcile)
            app = await self.store.get("applications", *key)
            if app is None or not app.get("operation"):
                return
            operation = app["operation"]
            started = now_rfc3339()

            def running(obj: dict[str, Any]) -> None:
                obj.setdefault("status", {})["operationState"] = {
                    "operation": operation,
                    "phase": "Running",
                    "message": "one or more tasks are running",
                    "startedAt": started,
                }

            await self.store.update("applications", key[0], key[1], running)
            await asyncio.sleep(self.timings.argo_sync)
            revision = ((operation.get("sync") or {}).get("revision")) or None
            phase, message, result = "Succeeded", "successfully synced (all tasks run)", None
            async with self._lock(key):
                try:
                    rendered = await self.render(app, revision)
                    resource = await self._apply(app, rendered)
                    result = {
                        "revision": rendered.revision,
                        "source": (app.get("spec") or {}).get("source") or {},
                        "resources": [resource],
                    }
                except CommandError as e:
                    phase, message = "Error", f"ComparisonError: {e}"
                finished = now_rfc3339()

                def done(obj: dict[str, Any]) -> None:
                    status = obj.setdefault("status", {})
                    state: dict[str, Any] = {
                        "operation": operation,
                        "phase": phase,
                        "message": message,
                        "startedAt": started,
                        "finishedAt": finished,
                    }
                    if result is not None:
                        state["syncResult"] = result
                        history = list(status.get("history") or [])
                        history.append(
                            {
                                "id": (history[-1]["id"] + 1) if history else 0,
                                "revision": result["revision"],
                                "deployStartedAt": started,
                                "deployedAt": finished,
                                "source": result["source"],
                                "initiatedBy": operation.get("initiatedBy") or {},
                            }
                        )
                        status["history"] = history[-10:]
                    status["operationState"] = state
                    # whatever `operation` holds now (the one we ran, or one patched meanwhile) goes
                    obj.pop("operation", None)

                await self.store.update("applications", key[0], key[1], done)
            await self.refresh(key)
        finally:
            self._syncing.pop(key, None)
            # an operation set after ours finished must still be picked up
            self.worker.schedule(key)

    def _desired(self, app: dict[str, Any], rendered: Rendered) -> dict[str, Any]:
        """The manifest Argo CD applies: the render, in the destination namespace, with its tracking label."""
        ns, _ = self._target_key(app, rendered)
        manifest: dict[str, Any] = yaml.safe_load(yaml.safe_dump(rendered.deployment))
        manifest["metadata"]["namespace"] = ns
        manifest["metadata"].setdefault("labels", {})[TRACKING_LABEL] = app["metadata"]["name"]
        manifest.pop("status", None)
        return manifest

    async def _apply(self, app: dict[str, Any], rendered: Rendered) -> dict[str, Any]:
        """Apply the whole rendered Deployment: create it, or put every rendered field back (spec and the
        rendered labels/annotations), which reverts a hand-made change to any of them."""
        ns, name = self._target_key(app, rendered)
        desired = self._desired(app, rendered)
        # what client-side apply records: the manifest as sent, before the server's defaults
        applied = json.dumps(desired, separators=(",", ":"), sort_keys=True)
        admission.default("deployments", desired)
        live = await self.store.get("deployments", ns, name)
        if live is None:
            desired["metadata"].setdefault("annotations", {})[LAST_APPLIED] = applied
            await self.store.create("deployments", desired)
            verb = "created"
        else:

            def put_back(obj: dict[str, Any]) -> None:
                # the three-way merge: what the last apply set and the render dropped goes first
                _, pruned = removed(last_applied(obj), json.loads(applied), obj)
                obj.clear()
                obj.update(pruned)
                obj["spec"] = merge_desired(obj.get("spec") or {}, desired.get("spec") or {})
                for field in ("labels", "annotations"):
                    if desired["metadata"].get(field):
                        obj["metadata"][field] = {
                            **(obj["metadata"].get(field) or {}),
                            **desired["metadata"][field],
                        }
                obj["metadata"].setdefault("annotations", {})[LAST_APPLIED] = applied

            before = live["metadata"].get("generation")
            after = await self.store.update("deployments", ns, name, put_back)
            verb = "configured" if after and after["metadata"].get("generation") != before else "unchanged"
        return {
            "group": "apps",
            "version": "v1",
            "kind": "Deployment",
            "namespace": ns,
            "name": name,
            "status": "Synced",
            "message": f"deployment.apps/{name} {verb}",
            "hookPhase": "Running",
            "syncPhase": "Sync",
        }
