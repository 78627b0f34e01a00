"""Why a pod does not start: cause, evidence and fix from its status, its events and the registries."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from bot.adapters.kube import JSON, ClusterClient
from bot.errors import BotError
from bot.settings import Environment

PULL_FAILURE_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff", "InvalidImageName"})
# the waiting reasons that end a rollout watch at once; a missing Secret (CreateContainerConfigError) may
# still appear, so it is reported by the snapshot but does not cut a rollout short
FAIL_FAST_REASONS = PULL_FAILURE_REASONS | {"CrashLoopBackOff"}
FAILING_REASONS = FAIL_FAST_REASONS | {"CreateContainerConfigError", "RunContainerError"}
_LOG_LINES = 20
# how long a pod may stay unschedulable before a watch reports it: the scheduler places it by itself as
# soon as a node frees up or joins, which on a healthy cluster takes seconds, not the Job or rollout timeout
UNSCHEDULABLE_GRACE = 4.0


class ImageStatusLike(Protocol):
    """What the registry adapter's check answers (bot.adapters.registry.ImageStatus)."""

    @property
    def state(self) -> str: ...  # "missing" | "wrong_platform" | "ok"

    @property
    def platforms(self) -> tuple[str, ...]: ...


ImageCheck = Callable[[str, str, str], Awaitable[ImageStatusLike]]
"""check(registry_prefix, image, tag) -> status, e.g. RegistryClient.check."""


class PullFailure(StrEnum):
    TAG_MISSING = "tag-missing"
    WRONG_PLATFORM = "wrong-platform"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    INVALID_NAME = "invalid-image-name"
    UNKNOWN = "unknown"


class Cause(StrEnum):
    TAG_MISSING = "tag-missing"
    WRONG_PLATFORM = "wrong-platform"
    REGISTRY_AUTH = "registry-auth"
    INVALID_IMAGE = "invalid-image"
    CRASH_LOOP = "crash-loop"
    EXEC_FORMAT = "exec-format"
    PENDING = "pending"
    CONFIG = "container-config"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Diagnosis:
    """A failure a person can act on: what broke, the quoted proof, what to do."""

    cause: str
    evidence: str
    fix: str
    details: Mapping[str, str] = field(default_factory=dict)
    kind: Cause = Cause.UNKNOWN
    pod: str = ""
    promote_from: tuple[str, ...] = ()  # envs whose registries hold the missing image (fix = promote)


# Order matters: the wrong-platform message also ends in "not found".
_CLASSIFIERS: tuple[tuple[re.Pattern[str], PullFailure], ...] = (
    (re.compile(r"no match for platform in manifest", re.I), PullFailure.WRONG_PLATFORM),
    (
        re.compile(r"401 Unauthorized|\bunauthorized\b|authentication required", re.I),
        PullFailure.UNAUTHORIZED,
    ),
    (re.compile(r"403 Forbidden|\bforbidden\b|\bdenied\b|permission denied", re.I), PullFailure.FORBIDDEN),
    (
        re.compile(r"InvalidImageName|invalid reference format|couldn't parse image|failed to parse", re.I),
        PullFailure.INVALID_NAME,
    ),
    (
        re.compile(r": not found\s*$|code = NotFound|manifest unknown|not found", re.I),
        PullFailure.TAG_MISSING,
    ),
)


def classify_pull_error(message: str) -> PullFailure:
    """Classify a kubelet/containerd image-pull message (the text of a `Failed` pod event)."""
    for pattern, failure in _CLASSIFIERS:
        if pattern.search(message):
            return failure
    return PullFailure.UNKNOWN


def split_image(ref: str) -> tuple[str, str, str]:
    """`host/path/name:tag` -> (registry prefix, image name, tag). `name:tag@sha256:…` (kustomize's digest pin)
    gives the tag; a reference by digest alone keeps `@sha256:…` as tag."""
    if "@" in ref:
        repo, digest = ref.split("@", 1)
        prefix, _, last = repo.rpartition("/")
        name, sep, tag = last.partition(":")
        return prefix, name, tag if sep else f"@{digest}"
    prefix, _, last = ref.rpartition("/")
    name, sep, tag = last.partition(":")
    return prefix, name, tag if sep else "latest"


def registry_reader_command(registry_prefix: str, node_sa: str | None = None) -> str:
    """The gcloud command granting a node service account read access to an Artifact Registry repository."""
    host, _, path = registry_prefix.partition("/")
    project, _, repo = path.partition("/")
    location = host.removesuffix("-docker.pkg.dev") if host.endswith("-docker.pkg.dev") else "<LOCATION>"
    member = node_sa or "<NODE_SERVICE_ACCOUNT>"
    return (
        f"gcloud artifacts repositories add-iam-policy-binding {repo or '<REPOSITORY>'} "
        f"--project={project or '<PROJECT>'} --location={location} "
        f"--member=serviceAccount:{member} --role=roles/artifactregistry.reader"
    )


def _container_statuses(pod: JSON) -> list[JSON]:
    status = pod.get("status") or {}
    return list(status.get("initContainerStatuses") or []) + list(status.get("containerStatuses") or [])


def failing_reason(pod: JSON) -> tuple[str, JSON] | None:
    """The first container waiting for a failure reason, with its status; None when nothing is failing."""
    for cs in _container_statuses(pod):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in FAILING_REASONS:
            return str(reason), cs
    return None


def unschedulable(pod: JSON) -> str | None:
    """The scheduler's reason when it could not place the pod (PodScheduled False), else None."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return str(cond.get("message") or cond.get("reason") or "Unschedulable")
    return None


def scheduling_hint(message: str, pod: JSON) -> str:
    """What to do about the scheduler's FailedScheduling message."""
    spec = pod.get("spec") or {}
    if "node affinity/selector" in message:
        return (
            f"No node matches the pod's nodeSelector {spec.get('nodeSelector') or {}}: add a node pool "
            "with those labels (GKE: gcloud container node-pools create …) or fix the selector."
        )
    if "Insufficient" in message:
        return (
            "The pod requests more than any node has free: lower its resources.requests, or add "
            "bigger nodes / enable the cluster autoscaler on the pool."
        )
    if "untolerated taint" in message:
        return (
            "The nodes are tainted: add the matching toleration or remove the taint (kubectl taint nodes …)."
        )
    return "Look at the pod's events (kubectl describe pod) and fix what the scheduler names."


def _event_time(ev: JSON) -> str:
    return str(
        ev.get("lastTimestamp")
        or ev.get("eventTime")
        or ev.get("firstTimestamp")
        or (ev.get("metadata") or {}).get("creationTimestamp")
        or ""
    )


async def pod_events(client: ClusterClient, namespace: str, pod_name: str) -> list[JSON]:
    """Events about one pod, oldest first."""
    listing = await client.call(
        f"events of pod {pod_name}",
        client.core.list_namespaced_event,
        namespace,
        field_selector=f"involvedObject.name={pod_name}",
    )
    return sorted(listing.get("items") or [], key=_event_time)


# the kubelet's detailed pull failures: containerd's answer, or the reference parser's for an invalid name
_DETAILED_PULL = ("Failed to pull image ", "Failed to apply default image tag ")
_PULL_EVENT_REASONS = frozenset({"Failed", "InspectFailed"})


def _pull_event(events: Sequence[JSON], container: str = "") -> JSON | None:
    """The kubelet's detailed pull failure for `container` (`Failed to pull image "…": <containerd message>`).

    While it backs off, the kubelet keeps emitting newer `Failed` events that read only `Error: ErrImagePull`
    or `Error: ImagePullBackOff`; they say nothing of the cause, so the newest detailed one wins over them.
    A sidecar failing to pull has events of its own (their fieldPath names it): they are never taken for
    the container being diagnosed.
    """
    field_suffix = f"{{{container}}}"

    def about_container(ev: JSON) -> bool:
        path = str((ev.get("involvedObject") or {}).get("fieldPath") or "")
        return not container or not path or path.endswith(field_suffix)

    candidates = [ev for ev in events if ev.get("reason") in _PULL_EVENT_REASONS and about_container(ev)]
    for ev in reversed(candidates):
        if str(ev.get("message") or "").startswith(_DETAILED_PULL):
            return ev
    for ev in reversed(candidates):
        msg = str(ev.get("message") or "")
        if "image" in msg.lower() and not msg.startswith("Error: "):
            return ev
    return None


@dataclass
class Diagnoser:
    """Builds diagnoses for one env; `check` and `envs` let it ask every env's registry about an image."""

    env: Environment
    envs: Sequence[Environment] = ()
    check: ImageCheck | None = None
    node_service_account: str | None = None
    event_grace: float = (
        1.0  # the kubelet writes the pod status and its event separately: wait this long for it
    )

    async def diagnose(self, client: ClusterClient, pod: JSON) -> Diagnosis | None:
        """Diagnose a pod; None when it shows no failure."""
        name = str((pod.get("metadata") or {}).get("name") or "")
        ns = str((pod.get("metadata") or {}).get("namespace") or self.env.namespace)
        failing = failing_reason(pod)
        if failing is not None:
            reason, cs = failing
            if reason in PULL_FAILURE_REASONS:
                return await self._pull(client, ns, name, reason=reason, cs=cs, pod=pod)
            if reason == "CrashLoopBackOff":
                return await self._crash(client, ns, name, cs, pod)
            waiting = (cs.get("state") or {}).get("waiting") or {}
            return Diagnosis(
                cause=f"container {cs.get('name')} cannot start ({reason})",
                evidence=str(waiting.get("message") or reason),
                fix="Check the container's configuration (env, secrets, config maps) in the overlay.",
                kind=Cause.CONFIG,
                pod=name,
                details={"reason": reason},
            )
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Pending":
            return await self._pending(client, ns, name, pod)
        return None

    async def _wait_pull_event(
        self, client: ClusterClient, ns: str, name: str, container: str
    ) -> JSON | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.event_grace
        while True:
            event = _pull_event(await pod_events(client, ns, name), container)
            if event is not None or loop.time() >= deadline:
                return event
            await asyncio.sleep(0.1)

    async def _registry_state(self, prefix: str, image: str, tag: str) -> tuple[ImageStatusLike | None, str]:
        if self.check is None:
            return None, "no registry check configured"
        try:
            return await self.check(prefix, image, tag), ""
        except BotError as e:
            return None, str(e)

    async def _promote_sources(self, image: str, tag: str) -> tuple[str, ...]:
        others = [e for e in self.envs if e.name != self.env.name]
        if self.check is None or not others:
            return ()
        results = await asyncio.gather(
            *(self._registry_state(e.registry, image, tag) for e in others), return_exceptions=False
        )
        return tuple(e.name for e, (st, _) in zip(others, results, strict=True) if st and st.state == "ok")

    async def _pull(
        self, client: ClusterClient, ns: str, name: str, *, reason: str, cs: JSON, pod: JSON
    ) -> Diagnosis:
        image = str(cs.get("image") or "")
        if not image:
            for c in (pod.get("spec") or {}).get("containers") or []:
                if c.get("name") == cs.get("name"):
                    image = str(c.get("image") or "")
        waiting_msg = str(((cs.get("state") or {}).get("waiting") or {}).get("message") or "")
        event = await self._wait_pull_event(client, ns, name, str(cs.get("name") or ""))
        event_msg = str(event.get("message")) if event else ""
        evidence = event_msg or waiting_msg or reason
        klass = PullFailure.INVALID_NAME if reason == "InvalidImageName" else classify_pull_error(evidence)
        prefix, img, tag = split_image(image)
        details: dict[str, str] = {"image": image, "container": str(cs.get("name") or ""), "reason": reason}
        if prefix != self.env.registry:
            details["registry mismatch"] = (
                f"the pod pulls from {prefix}, but {self.env.name}'s registry is {self.env.registry}"
            )

        if klass is PullFailure.INVALID_NAME:
            return Diagnosis(
                cause=f"the image reference {image!r} is not valid",
                evidence=evidence,
                fix="Fix the image name/tag in the overlay (newName/newTag) and deploy again.",
                details=details,
                kind=Cause.INVALID_IMAGE,
                pod=name,
            )

        status, check_error = await self._registry_state(prefix, img, tag)
        if check_error:
            details["registry check"] = check_error
        if status is not None:
            details["registry says"] = status.state + (
                f" (platforms: {', '.join(status.platforms)})" if status.platforms else ""
            )

        if klass in (PullFailure.UNAUTHORIZED, PullFailure.FORBIDDEN):
            secrets = [s.get("name") for s in (pod.get("spec") or {}).get("imagePullSecrets") or []]
            sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
            details["pod service account"] = str(sa)
            details["imagePullSecrets"] = ", ".join(str(s) for s in secrets) or "none"
            code = "401 Unauthorized" if klass is PullFailure.UNAUTHORIZED else "403 Forbidden"
            return Diagnosis(
                cause=f"the {self.env.name} nodes are not allowed to pull from {prefix} ({code})",
                evidence=evidence,
                fix=(
                    "Give the node service account read access to the registry: "
                    f"`{registry_reader_command(prefix, self.node_service_account)}`"
                    + (f"; or fix the imagePullSecrets ({details['imagePullSecrets']})" if secrets else "")
                ),
                details=details,
                kind=Cause.REGISTRY_AUTH,
                pod=name,
            )

        if klass is PullFailure.WRONG_PLATFORM or (status is not None and status.state == "wrong_platform"):
            found = (
                ", ".join(status.platforms) if status is not None and status.platforms else "not linux/amd64"
            )
            details["platforms found"] = found
            return Diagnosis(
                cause=f"{img}:{tag} has no linux/amd64 image (found: {found}); GKE nodes are linux/amd64",
                evidence=evidence,
                fix="Rebuild the image for linux/amd64 (docker buildx build --platform linux/amd64 …) and push it again.",
                details=details,
                kind=Cause.WRONG_PLATFORM,
                pod=name,
            )

        if klass is PullFailure.TAG_MISSING or (status is not None and status.state == "missing"):
            sources = await self._promote_sources(img, tag)
            if sources:
                fix = (
                    f"Promote {img}:{tag} from {' or '.join(sources)} to {self.env.name} "
                    f"(/funnelcake deploy {self.env.name} {tag} promotes it), then sync again."
                )
            else:
                fix = f"No registry has {img}:{tag}: build it for linux/amd64 and push it to {prefix}."
            return Diagnosis(
                cause=f"{img}:{tag} is missing from the {self.env.name} registry ({prefix})",
                evidence=evidence,
                fix=fix,
                details=details | {"present in": ", ".join(sources) or "no registry"},
                kind=Cause.TAG_MISSING,
                pod=name,
                promote_from=sources,
            )

        return Diagnosis(
            cause=f"the image {image} cannot be pulled ({reason})",
            evidence=evidence,
            fix="Read the event above; check the registry and the node's network access.",
            details=details,
            kind=Cause.UNKNOWN,
            pod=name,
        )

    async def _crash(self, client: ClusterClient, ns: str, name: str, cs: JSON, pod: JSON) -> Diagnosis:
        container = str(cs.get("name") or "")
        init = any(
            c.get("name") == container for c in (pod.get("spec") or {}).get("initContainers") or []
        ) or any(
            c.get("name") == container for c in (pod.get("status") or {}).get("initContainerStatuses") or []
        )
        terminated = (cs.get("lastState") or {}).get("terminated") or {}
        exit_code = terminated.get("exitCode")
        log_text = await _last_log(client, ns, name, container)
        lines = [ln for ln in log_text.splitlines() if ln.strip()][-_LOG_LINES:]
        details = {
            "container": container,
            "exit code": str(exit_code) if exit_code is not None else "unknown",
            "restarts": str(cs.get("restartCount", 0)),
            "image": str(cs.get("image") or ""),
        }
        last = "\n".join(lines) or "(no log output)"
        if "exec format error" in log_text:
            return Diagnosis(
                cause=f"{container} crashes at start with `exec format error`: the binary is built for another CPU architecture",
                evidence=last,
                fix="Rebuild the image for linux/amd64 (docker buildx build --platform linux/amd64 …) and deploy again.",
                details=details,
                kind=Cause.EXEC_FORMAT,
                pod=name,
            )
        if init:
            details["init container"] = "yes"
            return Diagnosis(
                cause=(
                    f"init container {container} keeps failing (exit code {details['exit code']}, "
                    f"{details['restarts']} restarts), so the pod's containers never start (Init:CrashLoopBackOff)"
                ),
                evidence=last,
                fix=(
                    f"Read its log above (kubectl logs {name} -c {container} --previous) and fix what it "
                    "checks or fetches, or roll back to the previous tag."
                ),
                details=details,
                kind=Cause.CRASH_LOOP,
                pod=name,
            )
        return Diagnosis(
            cause=f"{container} keeps crashing (exit code {details['exit code']}, {details['restarts']} restarts)",
            evidence=last,
            fix="Read the last log lines above; fix the cause or roll back to the previous tag.",
            details=details,
            kind=Cause.CRASH_LOOP,
            pod=name,
        )

    async def _pending(self, client: ClusterClient, ns: str, name: str, pod: JSON) -> Diagnosis | None:
        for cond in (pod.get("status") or {}).get("conditions") or []:
            if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
                msg = str(cond.get("message") or cond.get("reason") or "unschedulable")
                return Diagnosis(
                    cause="the pod cannot be scheduled",
                    evidence=msg,
                    fix=scheduling_hint(msg, pod),
                    details={"reason": str(cond.get("reason") or "")},
                    kind=Cause.PENDING,
                    pod=name,
                )
        for ev in reversed(await pod_events(client, ns, name)):
            if ev.get("reason") == "FailedScheduling":
                msg = str(ev.get("message") or "")
                return Diagnosis(
                    cause="the pod cannot be scheduled",
                    evidence=msg,
                    fix=scheduling_hint(msg, pod),
                    kind=Cause.PENDING,
                    pod=name,
                )
        return None


async def _last_log(client: ClusterClient, ns: str, pod: str, container: str) -> str:
    """The crashed container's log: the previous instance first, the current one as a fallback.

    A restart moves the current log to "previous" between our two reads, so both can come back empty
    for a moment: read again briefly before concluding there is no output.
    """
    kwargs: dict[str, Any] = {"container": container, "tail_lines": _LOG_LINES}
    for attempt in range(3):
        if attempt:
            await asyncio.sleep(0.2)
        for previous in (True, False):
            try:
                text = await client.text(
                    f"log of {pod}/{container}",
                    client.core.read_namespaced_pod_log,
                    pod,
                    ns,
                    previous=previous,
                    **kwargs,
                )
            except BotError:
                continue
            if text.strip():
                return text
    return ""
