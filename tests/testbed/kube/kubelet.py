"""The simulated kubelet: runs each pod's containers, pulling images from the env's REAL local registry.

A pull is a real OCI distribution request (GET manifest with the full Accept list, then the config blob
or the linux/amd64 child of an index), so a missing tag, an arm64-only image or a denied registry fail
with containerd's own messages, as on GKE. Containers then start, become Ready, crash-loop, or run to
completion through a program (the migrate Job), and the kubelet writes pod status, Events and logs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from tests.testbed.kube.controller import now_rfc3339

if TYPE_CHECKING:
    from tests.testbed.kube.controller import StoreView, Supervisor, Timings

log = logging.getLogger("testbed.kube.kubelet")

MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
)
_INDEX_TYPES = {MANIFEST_TYPES[1], MANIFEST_TYPES[3]}
NODE_PLATFORM = ("linux", "amd64")
# registries the nodes reach anonymously (the relay's metrics sidecar comes from Docker Hub)
PUBLIC_REGISTRIES = frozenset({"docker.io", "registry.k8s.io", "quay.io", "ghcr.io", "gcr.io"})

# the distribution reference grammar, enough to tell a valid image name from a typo
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = (
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
)
_REFERENCE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_COMPONENT}(?:/{_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)

# a program run by a container that runs to completion: (pod, container, env) -> (exit code, log)
Program = Callable[[dict[str, Any], dict[str, Any], dict[str, str]], Awaitable[tuple[int, str]]]


@dataclasses.dataclass(frozen=True)
class ImageRef:
    raw: str
    host: str
    repository: str
    reference: str  # tag or digest

    @property
    def tag(self) -> str:
        return self.reference if not self.reference.startswith("sha256:") else ""

    @property
    def binary(self) -> str:
        return self.repository.rsplit("/", 1)[-1]


def parse_image(raw: str) -> ImageRef | None:
    """None when the reference is invalid (the kubelet reports InvalidImageName)."""
    m = _REFERENCE.match(raw or "")
    if not m:
        return None
    domain, path = m.group("domain"), m.group("path")
    if domain and not ("." in domain or ":" in domain or domain == "localhost"):
        path, domain = f"{domain}/{path}", None
    if not domain:
        domain = "docker.io"
        if "/" not in path:
            path = f"library/{path}"
    ref = m.group("digest") or m.group("tag") or "latest"
    return ImageRef(raw=raw, host=domain, repository=path, reference=ref)


def go_duration(seconds: int) -> str:
    """time.Duration.String() for whole seconds: 10s, 1m20s, 5m0s."""
    minutes, secs = divmod(seconds, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def reference_error(raw: str) -> str:
    """The kubelet's parse failure text (parsers.ParseImageName over distribution/reference)."""
    name = raw.split("@", 1)[0]
    last = name.rsplit("/", 1)
    if ":" in last[-1]:
        name = name[: len(name) - len(last[-1]) + last[-1].index(":")]
    first, _, rest = name.partition("/")
    if not rest or not ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        remote = name if rest else f"library/{name}"
    else:
        remote = rest
    detail = "invalid reference format"
    if remote and remote.lower() != remote and _REFERENCE.match(raw.lower()):
        detail += f": repository name ({remote}) must be lowercase"
    return f'couldn\'t parse image name "{raw}": {detail}'


@dataclasses.dataclass(frozen=True)
class PullResult:
    ok: bool
    image_id: str = ""
    reason: str = ""  # ErrImagePull | InvalidImageName
    detail: str = ""  # containerd's error (the part after `Failed to pull image "X": `)


class EventRecorder:
    """Writes core/v1 Events, aggregating repeats (count, lastTimestamp) like the kubelet's recorder."""

    def __init__(self, store: StoreView) -> None:
        self.store = store
        self._names: dict[tuple[str, str, str, str], str] = {}
        self._last_stamp = 0

    async def record(
        self,
        obj: dict[str, Any],
        reason: str,
        message: str,
        *,
        component: str,
        warning: bool,
        field_path: str = "",
        host: str = "",
    ) -> None:
        meta = obj["metadata"]
        ns = meta.get("namespace", "default")
        key = (meta.get("uid", ""), reason, message, field_path)
        now = now_rfc3339()
        existing = self._names.get(key)
        if existing is not None:

            def bump(ev: dict[str, Any]) -> None:
                ev["count"] = int(ev.get("count", 1)) + 1
                ev["lastTimestamp"] = now

            if await self.store.update("events", ns, existing, bump) is not None:
                return
        # client-go names an event <object>.<hex UnixNano>: names sort in time order, as lists return them
        self._last_stamp = max(time.time_ns(), self._last_stamp + 1)
        name = f"{meta['name']}.{self._last_stamp:x}"
        involved = {
            "apiVersion": obj.get("apiVersion", "v1"),
            "kind": obj.get("kind", "Pod"),
            "name": meta["name"],
            "namespace": ns,
            "uid": meta.get("uid", ""),
            "resourceVersion": meta.get("resourceVersion", ""),
        }
        if field_path:
            involved["fieldPath"] = field_path
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "type": "Warning" if warning else "Normal",
            "source": {"component": component, **({"host": host} if host else {})},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": component,
            "reportingInstance": host,
        }
        await self.store.create("events", event)
        self._names[key] = name


@dataclasses.dataclass
class _Container:
    name: str
    image: str
    state: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}}
    )
    last_state: dict[str, Any] = dataclasses.field(default_factory=dict)
    ready: bool = False
    started: bool = False
    restart_count: int = 0
    image_id: str = ""
    container_id: str = ""

    def status(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "image": self.image,
            "imageID": self.image_id,
            "containerID": self.container_id,
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }


class Kubelet:
    """Runs every pod of the cluster; the knobs below make the registry or an image misbehave."""

    def __init__(
        self,
        store: StoreView,
        sup: Supervisor,
        timings: Timings,
        events: EventRecorder,
        *,
        registry_url: str,
        registry_prefix: str,
    ) -> None:
        self.store = store
        self.sup = sup
        self.timings = timings
        self.events = events
        self.registry_url = registry_url.rstrip("/")
        self.registry_host = registry_prefix.split("/", 1)[0]
        # knobs for tests and the demo
        self.deny_registry_pulls = False  # the nodes' service account lost access: 403 Forbidden
        self.crash_tags: set[str] = set()  # containers with these tags exit 1 and crash-loop
        self.exec_format_tags: set[str] = set()  # … with `exec format error` (a wrong-arch binary)
        self.programs: list[tuple[Callable[[ImageRef], bool], Program]] = []
        # what init containers run, by their spec (an init container no entry matches exits 0)
        self.init_programs: list[tuple[Callable[[dict[str, Any]], bool], Program]] = []
        self._pods: dict[str, asyncio.Task[Any]] = {}
        self._session: aiohttp.ClientSession | None = None

    # ---------------------------------------------------------------- lifecycle driven by the Store

    def observe(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"].get("uid", "")
        phase = (pod.get("status") or {}).get("phase")
        if uid in self._pods or phase in ("Succeeded", "Failed"):
            return
        if (pod.get("status") or {}).get("containerStatuses"):
            return  # already run by an earlier controller instance
        if not (pod.get("spec") or {}).get("nodeName"):
            return  # not scheduled: no kubelet runs it
        self._pods[uid] = self.sup.spawn(f"pod/{pod['metadata']['name']}", self._run_pod(pod))

    def forget(self, pod: dict[str, Any]) -> None:
        task = self._pods.pop(pod["metadata"].get("uid", ""), None)
        if task is not None:
            task.cancel()

    def collect_orphans(self, owner: dict[str, Any], sup: Supervisor) -> None:
        """Garbage collection: an owner's dependents go when it goes (background propagation)."""
        meta = owner["metadata"]
        ns, uid, name = meta.get("namespace", "default"), meta.get("uid"), meta.get("name", "")
        kind = owner.get("kind", "")

        async def collect() -> None:
            for pod in await self.store.list("pods", ns):
                for ref in pod["metadata"].get("ownerReferences") or []:
                    owned = ref.get("uid") == uid or (
                        kind == "Deployment"
                        and ref.get("kind") == "ReplicaSet"
                        and str(ref.get("name", "")).rsplit("-", 1)[0] == name
                    )
                    if owned:
                        await self.store.delete("pods", ns, pod["metadata"]["name"])
                        break

        sup.spawn(f"gc/{kind}/{name}", collect())

    async def close(self) -> None:
        for task in self._pods.values():
            task.cancel()
        self._pods.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ----------------------------------------------------------------------------- one pod's life

    async def _run_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        ns, name = meta.get("namespace", "default"), meta["name"]
        spec = pod.get("spec") or {}
        node = spec.get("nodeName") or "gke-node"
        restart_always = spec.get("restartPolicy", "Always") == "Always"
        restart_init = spec.get("restartPolicy", "Always") != "Never"
        ctrs = [_Container(c["name"], c.get("image", "")) for c in spec.get("containers") or []]
        inits = [_Container(c["name"], c.get("image", "")) for c in spec.get("initContainers") or []]
        if inits:
            for c in ctrs:
                c.state = {"waiting": {"reason": "PodInitializing"}}
            for c in inits:
                c.state = {"waiting": {"reason": "PodInitializing"}}
        pod_ip = f"10.8.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 2}"
        started_at = now_rfc3339()

        async def write() -> None:
            await self._write_status(
                ns, name, ctrs, restart_always, pod_ip, started_at, inits, restart_init=restart_init
            )

        try:
            await self.events.record(
                pod,
                "Scheduled",
                f"Successfully assigned {ns}/{name} to {node}",
                component="default-scheduler",
                warning=False,
            )
            await write()
            if inits and not await self._run_inits(pod, spec, inits, node, write):
                return  # an init container failed: the app containers never start
            for c in ctrs:
                if c.state.get("waiting", {}).get("reason") == "PodInitializing":
                    c.state = {"waiting": {"reason": "ContainerCreating"}}
            env_by_ctr: dict[str, dict[str, str]] = {}
            for spec_c, c in zip(spec.get("containers") or [], ctrs, strict=True):
                env = await self._wait_config(pod, spec_c, c, node, write)
                env_by_ctr[c.name] = env
                await self._pull_until_ok(pod, c, node, write)
            await asyncio.sleep(self.timings.container_start)
            for c in ctrs:
                c.container_id = f"containerd://{secrets.token_hex(32)}"
                await self.events.record(
                    pod,
                    "Created",
                    f"Created container {c.name}",
                    component="kubelet",
                    warning=False,
                    field_path=f"spec.containers{{{c.name}}}",
                    host=node,
                )
                await self.events.record(
                    pod,
                    "Started",
                    f"Started container {c.name}",
                    component="kubelet",
                    warning=False,
                    field_path=f"spec.containers{{{c.name}}}",
                    host=node,
                )
                c.state = {"running": {"startedAt": now_rfc3339()}}
                c.started = True
            await write()
            if restart_always:
                await self._serve(pod, spec, ctrs, node, write)
            else:
                await self._run_to_completion(pod, spec, ctrs, env_by_ctr, write)
        finally:
            self._pods.pop(meta.get("uid", ""), None)

    async def _run_inits(
        self,
        pod: dict[str, Any],
        spec: dict[str, Any],
        inits: list[_Container],
        node: str,
        write: Callable[[], Awaitable[None]],
    ) -> bool:
        """Init containers one after the other, each to its end; False when one failed for good.

        With restartPolicy Never a failed init container fails the pod (Init:Error). With Always or
        OnFailure the kubelet runs it again after its crash back-off (10s doubling to a 5m0s cap, this
        bed's timings scaled to it), the pod Pending in Init:CrashLoopBackOff meanwhile, until it succeeds.
        """
        ns, name = pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]
        restarts = spec.get("restartPolicy", "Always") != "Never"
        uid = pod["metadata"].get("uid", "")
        for spec_c, c in zip(spec.get("initContainers") or [], inits, strict=True):
            field = f"spec.initContainers{{{c.name}}}"
            backoff = self.timings.crash_backoff
            await self.events.record(
                pod,
                "Pulled",
                f'Container image "{c.image}" already present on machine',
                component="kubelet",
                warning=False,
                field_path=field,
                host=node,
            )
            while True:
                for reason, message in (
                    ("Created", f"Created container {c.name}"),
                    ("Started", f"Started container {c.name}"),
                ):
                    await self.events.record(
                        pod, reason, message, component="kubelet", warning=False, field_path=field, host=node
                    )
                c.container_id = f"containerd://{secrets.token_hex(32)}"
                started = now_rfc3339()
                c.state = {"running": {"startedAt": started}}
                c.started = True
                await write()
                await asyncio.sleep(self.timings.container_start)
                code, text = 0, ""
                for matches, program in self.init_programs:
                    if matches(spec_c):
                        code, text = await program(pod, spec_c, {})
                        break
                await self.store.set_log(ns, name, c.name, text)
                terminated = {
                    "exitCode": code,
                    "reason": "Completed" if code == 0 else "Error",
                    "startedAt": started,
                    "finishedAt": now_rfc3339(),
                    "containerID": c.container_id,
                }
                c.state = {"terminated": terminated}
                c.started = False
                c.ready = code == 0
                await write()
                if code == 0:
                    break
                if not restarts:
                    return False
                # the kubelet restarts it after its back-off; meanwhile it waits in CrashLoopBackOff
                await asyncio.sleep(self.timings.crash_after)
                secs = min(round(backoff / self.timings.crash_backoff * 10), 300)
                c.last_state = {"terminated": terminated}
                c.restart_count += 1
                c.state = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {go_duration(secs)} restarting failed container={c.name} "
                        f"pod={name}_{ns}({uid})",
                    }
                }
                await self.events.record(
                    pod,
                    "BackOff",
                    f"Back-off restarting failed container {c.name} in pod {name}_{ns}({uid})",
                    component="kubelet",
                    warning=True,
                    field_path=field,
                    host=node,
                )
                await write()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.timings.crash_backoff_max)
                await self.store.rotate_log(ns, name, c.name)
        return True

    async def _serve(
        self,
        pod: dict[str, Any],
        spec: dict[str, Any],
        ctrs: list[_Container],
        node: str,
        write: Callable[[], Awaitable[None]],
    ) -> None:
        """A long-running service: Ready after the readiness delay, or a crash loop for marked tags."""
        crashing = [c for c in ctrs if self._crashes(c.image)]
        if not crashing:
            await asyncio.sleep(self.timings.ready_delay)
            for c in ctrs:
                c.ready = True
            await write()
            return
        ns, name = pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]
        backoff = self.timings.crash_backoff
        while True:
            await asyncio.sleep(self.timings.crash_after)
            for c in crashing:
                text = self._crash_log(c.image)
                finished = now_rfc3339()
                started = c.state.get("running", {}).get("startedAt", finished)
                c.last_state = {
                    "terminated": {
                        "exitCode": 1,
                        "reason": "Error",
                        "startedAt": started,
                        "finishedAt": finished,
                        "containerID": c.container_id,
                    }
                }
                c.restart_count += 1
                c.started = False
                c.ready = False
                # the kubelet's back-off: 10s doubling to a 5m0s cap (this bed's timings scaled to it)
                secs = min(round(backoff / self.timings.crash_backoff * 10), 300)
                c.state = {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {go_duration(secs)} restarting failed container={c.name} "
                        f"pod={name}_{ns}({pod['metadata'].get('uid', '')})",
                    }
                }
                await self.store.set_log(ns, name, c.name, text)
                await self.events.record(
                    pod,
                    "BackOff",
                    f"Back-off restarting failed container {c.name} in pod "
                    f"{name}_{ns}({pod['metadata'].get('uid', '')})",
                    component="kubelet",
                    warning=True,
                    field_path=f"spec.containers{{{c.name}}}",
                    host=node,
                )
            await write()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.timings.crash_backoff_max)
            for c in crashing:
                await self.store.rotate_log(ns, name, c.name)
                c.container_id = f"containerd://{secrets.token_hex(32)}"
                c.state = {"running": {"startedAt": now_rfc3339()}}
                c.started = True
                await self.events.record(
                    pod,
                    "Created",
                    f"Created container {c.name}",
                    component="kubelet",
                    warning=False,
                    field_path=f"spec.containers{{{c.name}}}",
                    host=node,
                )
                await self.events.record(
                    pod,
                    "Started",
                    f"Started container {c.name}",
                    component="kubelet",
                    warning=False,
                    field_path=f"spec.containers{{{c.name}}}",
                    host=node,
                )
            await write()

    async def _run_to_completion(
        self,
        pod: dict[str, Any],
        spec: dict[str, Any],
        ctrs: list[_Container],
        env_by_ctr: dict[str, dict[str, str]],
        write: Callable[[], Awaitable[None]],
    ) -> None:
        """restartPolicy Never (Job pods): each container runs its program once and terminates.

        OnFailure is treated like Never: the Job controller, not the kubelet, does the retrying here.
        """
        ns, name = pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]
        await asyncio.sleep(self.timings.job_run)
        for spec_c, c in zip(spec.get("containers") or [], ctrs, strict=True):
            code, text = await self._program(pod, spec_c, env_by_ctr.get(c.name, {}))
            await self.store.set_log(ns, name, c.name, text)
            started = c.state.get("running", {}).get("startedAt", now_rfc3339())
            c.state = {
                "terminated": {
                    "exitCode": code,
                    "reason": "Completed" if code == 0 else "Error",
                    "startedAt": started,
                    "finishedAt": now_rfc3339(),
                    "containerID": c.container_id,
                }
            }
            c.started = False
            c.ready = False
        await write()

    async def _program(
        self, pod: dict[str, Any], container: dict[str, Any], env: dict[str, str]
    ) -> tuple[int, str]:
        ref = parse_image(container.get("image", ""))
        if ref is not None:
            if self._crashes(container.get("image", "")):
                return 1, self._crash_log(container.get("image", ""))
            for matches, program in self.programs:
                if matches(ref):
                    return await program(pod, container, env)
        return 0, ""

    def _crashes(self, image: str) -> bool:
        ref = parse_image(image)
        return ref is not None and (ref.tag in self.crash_tags or ref.tag in self.exec_format_tags)

    def _crash_log(self, image: str) -> str:
        ref = parse_image(image)
        assert ref is not None
        if ref.tag in self.exec_format_tags:
            return f"exec /usr/local/bin/{ref.binary}: exec format error\n"
        return (
            f"{ref.binary}: starting\n"
            f"panic: testbed: tag {ref.tag} is marked to crash\n\ngoroutine 1 [running]:\nmain.main()\n"
        )

    # ------------------------------------------------------------------- config (env from Secrets)

    async def _wait_config(
        self,
        pod: dict[str, Any],
        spec_c: dict[str, Any],
        c: _Container,
        node: str,
        write: Callable[[], Awaitable[None]],
    ) -> dict[str, str]:
        """Resolve the container's env; a missing Secret is CreateContainerConfigError until it appears."""
        ns = pod["metadata"].get("namespace", "default")
        while True:
            env, missing = await self._resolve_env(ns, spec_c)
            if missing is None:
                return env
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": missing}}
            await write()
            await self.events.record(
                pod,
                "Failed",
                f"Error: {missing}",
                component="kubelet",
                warning=True,
                field_path=f"spec.containers{{{c.name}}}",
                host=node,
            )
            await asyncio.sleep(self.timings.pull_backoff)

    async def _resolve_env(self, ns: str, spec_c: dict[str, Any]) -> tuple[dict[str, str], str | None]:
        env: dict[str, str] = {}
        secrets_cache: dict[str, dict[str, Any] | None] = {}

        async def secret(name: str) -> dict[str, Any] | None:
            if name not in secrets_cache:
                secrets_cache[name] = await self.store.get("secrets", ns, name)
            return secrets_cache[name]

        for src in spec_c.get("envFrom") or []:
            ref = src.get("secretRef")
            if ref:
                s = await secret(ref["name"])
                if s is None:
                    if ref.get("optional"):
                        continue
                    return env, f'secret "{ref["name"]}" not found'
                for k, v in _secret_data(s).items():
                    env[f"{src.get('prefix', '')}{k}"] = v
        for item in spec_c.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
                continue
            ref = (item.get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                env[item["name"]] = ""
                continue
            s = await secret(ref["name"])
            data = _secret_data(s) if s is not None else None
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                if data is None:
                    return env, f'secret "{ref["name"]}" not found'
                return env, f"couldn't find key {ref['key']} in Secret {ns}/{ref['name']}"
            env[item["name"]] = data[ref["key"]]
        return env, None

    # ------------------------------------------------------------------------------------- pulling

    async def _pull_until_ok(
        self, pod: dict[str, Any], c: _Container, node: str, write: Callable[[], Awaitable[None]]
    ) -> None:
        field = f"spec.containers{{{c.name}}}"
        backoff = self.timings.pull_backoff
        while True:
            await asyncio.sleep(self.timings.pull_delay)
            ref = parse_image(c.image)
            if ref is None:
                msg = f'Failed to apply default image tag "{c.image}": {reference_error(c.image)}'
                c.state = {"waiting": {"reason": "InvalidImageName", "message": msg}}
                await write()
                await self.events.record(
                    pod, "InspectFailed", msg, component="kubelet", warning=True, field_path=field, host=node
                )
                await self.events.record(
                    pod,
                    "Failed",
                    "Error: InvalidImageName",
                    component="kubelet",
                    warning=True,
                    field_path=field,
                    host=node,
                )
                await asyncio.Event().wait()  # never retried: only a new pod spec helps
            await self.events.record(
                pod,
                "Pulling",
                f'Pulling image "{c.image}"',
                component="kubelet",
                warning=False,
                field_path=field,
                host=node,
            )
            result = await self.pull(c.image)
            if result.ok:
                c.image_id = result.image_id
                c.state = {"waiting": {"reason": "ContainerCreating"}}
                await self.events.record(
                    pod,
                    "Pulled",
                    f'Successfully pulled image "{c.image}"',
                    component="kubelet",
                    warning=False,
                    field_path=field,
                    host=node,
                )
                return
            c.state = {"waiting": {"reason": "ErrImagePull", "message": result.detail}}
            await write()
            await self.events.record(
                pod,
                "Failed",
                f'Failed to pull image "{c.image}": {result.detail}',
                component="kubelet",
                warning=True,
                field_path=field,
                host=node,
            )
            await self.events.record(
                pod,
                "Failed",
                "Error: ErrImagePull",
                component="kubelet",
                warning=True,
                field_path=field,
                host=node,
            )
            await asyncio.sleep(self.timings.pull_backoff / 2)
            c.state = {
                "waiting": {
                    "reason": "ImagePullBackOff",
                    "message": f'Back-off pulling image "{c.image}": ErrImagePull: {result.detail}',
                }
            }
            await write()
            await self.events.record(
                pod,
                "BackOff",
                f'Back-off pulling image "{c.image}"',
                component="kubelet",
                warning=False,
                field_path=field,
                host=node,
            )
            await self.events.record(
                pod,
                "Failed",
                "Error: ImagePullBackOff",
                component="kubelet",
                warning=True,
                field_path=field,
                host=node,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.timings.pull_backoff_max)

    async def pull(self, image: str) -> PullResult:
        """Resolve `image` for linux/amd64 against the registry, as containerd would."""
        ref = parse_image(image)
        if ref is None:
            return PullResult(ok=False, reason="InvalidImageName", detail="invalid reference format")
        unpack = f'failed to pull and unpack image "{image}"'
        resolve = f'{unpack}: failed to resolve reference "{image}"'
        url_path = f"/v2/{ref.repository}/manifests/{ref.reference}"
        if self.deny_registry_pulls or (ref.host != self.registry_host and ref.host not in PUBLIC_REGISTRIES):
            # the node's service account has no reader role on that registry
            return PullResult(
                ok=False,
                reason="ErrImagePull",
                detail=f"rpc error: code = Unknown desc = {resolve}: unexpected status from HEAD request "
                f"to https://{ref.host}{url_path}: 403 Forbidden",
            )
        if ref.host in PUBLIC_REGISTRIES:
            # public images (sidecars) are not in the test bed's registries; pulling them always works
            return PullResult(ok=True, image_id=f"{ref.host}/{ref.repository}@sha256:{'0' * 64}")
        session = self._http()
        base = self.registry_url
        try:
            status, mtype, body = await self._get(session, f"{base}{url_path}", accept=MANIFEST_TYPES)
            if status == 404:
                return PullResult(
                    ok=False,
                    reason="ErrImagePull",
                    detail=f"rpc error: code = NotFound desc = {resolve}: {image}: not found",
                )
            if status in (401, 403):
                text = "401 Unauthorized" if status == 401 else "403 Forbidden"
                return PullResult(
                    ok=False,
                    reason="ErrImagePull",
                    detail=f"rpc error: code = Unknown desc = {resolve}: unexpected status from HEAD "
                    f"request to https://{ref.host}{url_path}: {text}",
                )
            if status != 200:
                return PullResult(
                    ok=False,
                    reason="ErrImagePull",
                    detail=f"rpc error: code = Unknown desc = {resolve}: unexpected status from GET "
                    f"request to https://{ref.host}{url_path}: {status}",
                )
            manifest = json.loads(body)
            mtype = manifest.get("mediaType") or mtype
            if mtype in _INDEX_TYPES:
                child = next(
                    (
                        m
                        for m in manifest.get("manifests") or []
                        if (m.get("platform") or {}).get("os") == NODE_PLATFORM[0]
                        and (m.get("platform") or {}).get("architecture") == NODE_PLATFORM[1]
                    ),
                    None,
                )
                if child is None:
                    return self._no_platform(unpack)
                status, mtype, body = await self._get(
                    session, f"{base}/v2/{ref.repository}/manifests/{child['digest']}", accept=MANIFEST_TYPES
                )
                if status != 200:
                    return PullResult(
                        ok=False,
                        reason="ErrImagePull",
                        detail=f"rpc error: code = NotFound desc = {unpack}: {child['digest']}: not found",
                    )
                manifest = json.loads(body)
            config_digest = (manifest.get("config") or {}).get("digest", "")
            status, _, body = await self._get(session, f"{base}/v2/{ref.repository}/blobs/{config_digest}")
            if status != 200:
                return PullResult(
                    ok=False,
                    reason="ErrImagePull",
                    detail=f"rpc error: code = NotFound desc = {unpack}: failed to copy: "
                    f"httpReadSeeker: failed open: content at https://{ref.host}/v2/{ref.repository}"
                    f"/blobs/{config_digest} not found: not found",
                )
            config = json.loads(body)
            if (config.get("os"), config.get("architecture")) != NODE_PLATFORM:
                return self._no_platform(unpack)
            return PullResult(ok=True, image_id=f"{ref.host}/{ref.repository}@{config_digest}")
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
            return PullResult(
                ok=False,
                reason="ErrImagePull",
                detail=f"rpc error: code = Unknown desc = {resolve}: failed to do request: Head "
                f'"https://{ref.host}{url_path}": dial tcp {ref.host}: connect: connection refused '
                f"({type(e).__name__})",
            )

    @staticmethod
    def _no_platform(unpack: str) -> PullResult:
        return PullResult(
            ok=False,
            reason="ErrImagePull",
            detail=f"rpc error: code = NotFound desc = {unpack}: no match for platform in manifest: not found",
        )

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timings.http_timeout)
            )
        return self._session

    @staticmethod
    async def _get(
        session: aiohttp.ClientSession, url: str, *, accept: tuple[str, ...] = ()
    ) -> tuple[int, str, bytes]:
        headers = {"Accept": ", ".join(accept)} if accept else {}
        async with session.get(url, headers=headers) as resp:
            body = await resp.read()
            return resp.status, resp.headers.get("Content-Type", ""), body

    # ---------------------------------------------------------------------------------- pod status

    async def _write_status(
        self,
        ns: str,
        name: str,
        ctrs: list[_Container],
        restart_always: bool,
        pod_ip: str,
        started_at: str,
        inits: list[_Container] | None = None,
        *,
        restart_init: bool = False,
    ) -> None:
        """`restart_init`: a failed init container is run again (restartPolicy Always or OnFailure)."""
        inits = inits or []
        terminated = [c.state["terminated"] for c in ctrs if "terminated" in c.state]
        init_failed = any(c.state.get("terminated", {}).get("exitCode") not in (None, 0) for c in inits)
        initialized = all(c.state.get("terminated", {}).get("exitCode") == 0 for c in inits)
        if init_failed and not restart_init:
            phase = "Failed"
        elif not initialized:
            phase = "Pending"
        elif not restart_always and ctrs and len(terminated) == len(ctrs):
            phase = "Succeeded" if all(t["exitCode"] == 0 for t in terminated) else "Failed"
        elif any(c.started or c.restart_count for c in ctrs):
            phase = "Running"
        else:
            phase = "Pending"
        all_ready = bool(ctrs) and all(c.ready for c in ctrs)
        now = now_rfc3339()
        not_ready = [c.name for c in ctrs if not c.ready]

        def put(pod: dict[str, Any]) -> None:
            prev = {c["type"]: c for c in (pod.get("status") or {}).get("conditions") or []}

            def cond(ctype: str, ok: bool, reason: str = "") -> dict[str, Any]:
                status = "True" if ok else "False"
                old = prev.get(ctype) or {}
                out: dict[str, Any] = {
                    "type": ctype,
                    "status": status,
                    "lastProbeTime": None,
                    "lastTransitionTime": old.get("lastTransitionTime", now)
                    if old.get("status") == status
                    else now,
                }
                if not ok and reason:
                    out["reason"] = reason
                    out["message"] = f"containers with unready status: [{' '.join(not_ready)}]"
                return out

            def initialized_cond() -> dict[str, Any]:
                out = cond("Initialized", initialized)
                if not initialized:
                    waiting = [c.name for c in inits if c.state.get("terminated", {}).get("exitCode") != 0]
                    out["reason"] = "ContainersNotInitialized"
                    out["message"] = f"containers with incomplete status: [{' '.join(waiting)}]"
                return out

            done = phase in ("Succeeded", "Failed")
            pod["status"] = {
                "phase": phase,
                "conditions": [
                    cond("PodReadyToStartContainers", True),
                    initialized_cond(),
                    cond("Ready", all_ready, "PodCompleted" if done else "ContainersNotReady"),
                    cond("ContainersReady", all_ready, "PodCompleted" if done else "ContainersNotReady"),
                    cond("PodScheduled", True),
                ],
                "hostIP": "10.128.0.7",
                "podIP": pod_ip,
                "podIPs": [{"ip": pod_ip}],
                "startTime": started_at,
                "containerStatuses": [c.status() for c in ctrs],
                "qosClass": "BestEffort",
            }
            if inits:
                pod["status"]["initContainerStatuses"] = [c.status() for c in inits]

        await self.store.update("pods", ns, name, put, subresource="status")


def _secret_data(secret: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (secret.get("data") or {}).items():
        with contextlib.suppress(ValueError):
            out[k] = base64.b64decode(v).decode()
    for k, v in (secret.get("stringData") or {}).items():
        out[k] = str(v)
    return out
