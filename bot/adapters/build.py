"""Build an image for linux/amd64 as a kaniko Job in the target env's cluster, pushing to that env's registry (F4).

Why kaniko rather than BuildKit rootless: kaniko runs as an ordinary unprivileged container, while
rootless BuildKit on GKE needs seccomp and AppArmor set to unconfined (or a privileged pod) for its user
namespaces; kaniko also pushes to Artifact Registry with the pod's Workload Identity, so no registry
credential ever passes through the bot. The build runs next to the registry it pushes to, never on a laptop,
so the platform is always the cluster's linux/amd64 (the runbook's "built on a Mac" trap).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bot.adapters.jobs import finished, read_log, run_job, stuck_cause
from bot.adapters.kube import JSON, KubeClients
from bot.errors import PermanentError
from bot.settings import MIGRATE_IMAGE, Environment, Service

KANIKO_IMAGE = "gcr.io/kaniko-project/executor:v1.23.2"
GIT_IMAGE = "alpine/git:2.47.2"
Progress = Callable[[str, Mapping[str, Any]], Awaitable[None]]
# The clone script reads the URL and commit from the environment: nothing is interpolated into a shell.
CLONE_SCRIPT = (
    'git clone --quiet "$REPO_URL" /workspace && git -C /workspace checkout --quiet --detach "$COMMIT"'
)


@dataclass(frozen=True)
class BuildRecipe:
    context: str  # directory inside the repo
    dockerfile: str
    target: str | None


def recipe(image: str) -> BuildRecipe:
    if image == MIGRATE_IMAGE:
        return BuildRecipe("database", "database/Dockerfile", None)
    for service in Service:
        if service.image == image:
            return BuildRecipe(".", "Dockerfile", service.value)
    raise PermanentError(f"no build recipe for image {image}")


def build_job(
    env: Environment, image: str, sha: str, short: str, *, repo_url: str, service_account: str
) -> JSON:
    """The Job spec; everything in it comes from config and the resolved commit, never from user text."""
    r = recipe(image)
    destination = env.image_ref(image, short)
    args = [
        f"--context=dir:///workspace/{r.context}".rstrip("/."),
        f"--dockerfile=/workspace/{r.dockerfile}",
        f"--destination={destination}",
        "--custom-platform=linux/amd64",
        "--digest-file=/dev/termination-log",
        f"--label=org.opencontainers.image.revision={sha}",
    ]
    if r.target:
        args.append(f"--target={r.target}")
    name = f"funnelcake-build-{image.removeprefix('funnelcake-')}-{short}"
    labels = {
        "app.kubernetes.io/name": "funnelcake-build",
        "app.kubernetes.io/managed-by": "funnelcake-deploy-bot",
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": env.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 1,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": service_account,
                    "nodeSelector": {"kubernetes.io/arch": "amd64"},
                    "volumes": [{"name": "workspace", "emptyDir": {}}],
                    "initContainers": [
                        {
                            "name": "clone",
                            "image": GIT_IMAGE,
                            "command": ["sh", "-c", CLONE_SCRIPT],
                            "env": [
                                {"name": "REPO_URL", "value": repo_url},
                                {"name": "COMMIT", "value": sha},
                            ],
                            "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}],
                        }
                    ],
                    "containers": [
                        {
                            "name": "kaniko",
                            "image": KANIKO_IMAGE,
                            "args": args,
                            "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}],
                            "resources": {"requests": {"cpu": "1", "memory": "2Gi"}},
                        }
                    ],
                },
            },
        },
    }


class Builder:
    """Builds missing images in the target env's cluster; one Job per image and commit."""

    def __init__(
        self,
        kube: KubeClients,
        *,
        repo_url: str,
        service_account: str = "funnelcake-builder",
        limit: float = 1800.0,
    ) -> None:
        self.kube = kube
        self.repo_url = repo_url
        self.service_account = service_account
        self.limit = limit

    async def build(self, env: Environment, image: str, sha: str, short: str, progress: Progress) -> None:
        job = build_job(env, image, sha, short, repo_url=self.repo_url, service_account=self.service_account)
        client = self.kube[env.kube_context]
        seen: set[str] = set()

        async def on_update(obj: JSON) -> None:
            if finished(obj):
                return  # a finished Job has no active pod; that is not "starting"
            status = obj.get("status") or {}
            state = "running" if status.get("active") else "starting"
            if state not in seen:
                seen.add(state)
                await progress(
                    f"{env.name}/{image}:{short} build {state} (Job {job['metadata']['name']})", {}
                )

        run = await run_job(
            client, job, container="kaniko", what="build", limit=self.limit, on_update=on_update
        )
        if not run.succeeded:
            name = str(job["metadata"]["name"])
            uid_of_run = str((run.job.get("metadata") or {}).get("uid") or "")
            cause = await stuck_cause(client, env.namespace, name, uid_of_run, what="build")
            if cause is not None:
                raise cause  # e.g. the clone init container failed: kaniko's own log is empty
            # A failed clone means kaniko never started: git's own message is in the init container's log.
            uid = str((run.job.get("metadata") or {}).get("uid") or "")
            _, clone_log = await read_log(client, env.namespace, name, "clone", uid=uid)
            clone_tail = "\n".join(clone_log.rstrip().splitlines()[-5:])
            raise PermanentError(
                f"the build of {image}:{short} for {env.name} failed (Job {name})",
                hint="Last lines of the build log:\n"
                + (run.tail() or "(no log)")
                + (f"\nClone step:\n{clone_tail}" if clone_tail else ""),
            )
