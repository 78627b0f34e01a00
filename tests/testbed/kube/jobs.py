"""The simulated Job controller and the migrate container's behaviour against a simulated ClickHouse.

The migrate image is tagged with the app repo's short sha; its migrations are read at that commit from
the app bare remote (database/migrations/NNNNNN_name.up.sql). The container behaves like golang-migrate
behind funnelcake's entrypoint (DESIGN.md §1, §5): per-migration lines, `no change`, a half-applied
migration leaving the database dirty, `force X`, and the wrong connection mode timing out on port 9440.

Simplifications: one pod at a time (parallelism 1, completions 1 by default); restartPolicy OnFailure is
run like Never (the Job controller replaces the pod); ttlSecondsAfterFinished is ignored, so a finished
Job stays until deleted (the bot deletes it before creating the next one with the same name).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.testbed.kube.argocd import CommandError, GitMirror
from tests.testbed.kube.controller import KeyedWorker, now_rfc3339, pod_is_ready, rand_suffix
from tests.testbed.kube.kubelet import ImageRef

if TYPE_CHECKING:
    from tests.testbed.kube.controller import StoreView, Supervisor, Timings
    from tests.testbed.kube.kubelet import Kubelet

log = logging.getLogger("testbed.kube.jobs")

MIGRATE_IMAGE = "funnelcake-migrate"
MIGRATIONS_DIR = "database/migrations"
FAILS_HALFWAY = "-- testbed: fails-halfway"
_UP_FILE = re.compile(r"^(?P<version>\d+)_(?P<name>.+)\.up\.sql$")
# where the cloud DSN resolves inside a self-hosted cluster: nothing listens on 9440 there
_UNREACHABLE_TLS = "10.0.0.12:9440"


@dataclasses.dataclass
class ClickHouseState:
    """The schema_migrations table of one env's ClickHouse: version, dirty flag, what happened."""

    version: int | None = None
    dirty: bool = False
    history: list[str] = dataclasses.field(default_factory=list)

    def note(self, what: str) -> None:
        self.history.append(f"{now_rfc3339()} {what}")


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    body: str


def _duration(name: str) -> str:
    # deterministic, plausible timings: the same migration always "takes" the same time
    h = int(hashlib.sha256(name.encode()).hexdigest()[:6], 16)
    return f"{5 + h % 400 / 10:.1f}ms"


def _dsn(env: dict[str, str]) -> str:
    """The DSN funnelcake's entrypoint hands to migrate, password and all (database/entrypoint.sh).

    The simulated failure quotes it, as a driver error can: the bot must scrub it before it goes anywhere.
    """
    creds = (
        f"username={env.get('CLICKHOUSE_USER', '')}&password={env.get('CLICKHOUSE_PASSWORD', '')}"
        f"&database={env.get('CLICKHOUSE_DATABASE', '')}"
    )
    if env.get("CLICKHOUSE_URL"):
        host = env["CLICKHOUSE_URL"].split("://", 1)[-1].split(":", 1)[0].split("/", 1)[0]
        return f"clickhouse://{host}:9440?{creds}&secure=true&x-multi-statement=true"
    return f"clickhouse://{env.get('CLICKHOUSE_HOST')}:{env.get('CLICKHOUSE_PORT')}?{creds}&x-multi-statement=true"


class MigrateProgram:
    """What the funnelcake-migrate container does when it runs, given its env and args."""

    def __init__(self, state: ClickHouseState, *, mode: str, app: GitMirror) -> None:
        self.state = state
        self.mode = mode
        self.app = app

    async def migrations_at(self, tag: str) -> list[Migration]:
        await self.app.fetch()
        sha = await self.app.resolve(tag)
        out: list[Migration] = []
        for path in await self.app.ls(sha, MIGRATIONS_DIR):
            m = _UP_FILE.match(path.rsplit("/", 1)[-1])
            if m:
                out.append(
                    Migration(int(m.group("version")), m.group("name"), await self.app.show(sha, path))
                )
        return sorted(out, key=lambda m: m.version)

    async def __call__(
        self, pod: dict[str, Any], container: dict[str, Any], env: dict[str, str]
    ) -> tuple[int, str]:
        from tests.testbed.kube.kubelet import parse_image  # noqa: PLC0415 - avoids an import cycle

        ref = parse_image(container.get("image", ""))
        # the image's CMD is `up`; the entrypoint builds the DSN from the env, then runs migrate with args
        args = [str(a) for a in (container.get("args") or ["up"])]
        if self.mode == "self-hosted" and "CLICKHOUSE_URL" in env:
            return 1, f"error: dial tcp {_UNREACHABLE_TLS}: i/o timeout\n"
        if self.mode == "cloud" and "CLICKHOUSE_URL" not in env:
            host = env.get("CLICKHOUSE_HOST")
            if host:
                return 1, f"error: dial tcp: lookup {host} on 10.0.0.10:53: no such host\n"
            return 1, "error: CLICKHOUSE_URL is not set (ClickHouse Cloud needs the URL from the secret)\n"
        if self.mode == "self-hosted" and not env.get("CLICKHOUSE_HOST"):
            return 1, "error: CLICKHOUSE_HOST is not set\n"
        cmd, rest = args[0], args[1:]
        if cmd == "force":
            return self._force(rest)
        if cmd == "version":
            if self.state.version is None:
                return 1, "error: no migration\n"
            return 0, f"{self.state.version}{' (dirty)' if self.state.dirty else ''}\n"
        if cmd != "up":
            return 2, f"error: unsupported command {cmd!r} in the test bed (up, force, version)\n"
        assert ref is not None
        try:
            migrations = await self.migrations_at(ref.tag or ref.reference)
        except CommandError as e:
            return 1, f"error: cannot read the migrations baked into {ref.raw}: {e}\n"
        limit = int(rest[0]) if rest and rest[0].isdigit() else None
        return self._up(migrations, limit, _dsn(env))

    def _force(self, rest: list[str]) -> tuple[int, str]:
        if not rest:
            return 1, "error: please specify version argument V\n"
        try:
            version = int(rest[0])
        except ValueError:
            return (
                1,
                f'error: can\'t read version argument V: strconv.ParseInt: parsing "{rest[0]}": invalid syntax\n',
            )
        self.state.version = None if version == -1 else version
        self.state.dirty = False
        self.state.note(f"force {version}")
        return 0, ""

    def _up(self, migrations: list[Migration], limit: int | None, dsn: str) -> tuple[int, str]:
        if self.state.dirty:
            return 1, f"error: Dirty database version {self.state.version}. Fix and force version.\n"
        current = self.state.version if self.state.version is not None else 0
        pending = [m for m in migrations if m.version > current]
        if limit is not None:
            pending = pending[:limit]
        if not pending:
            self.state.note("up: no change")
            return 0, "no change\n"
        lines: list[str] = []
        for m in pending:
            if FAILS_HALFWAY in m.body:
                self.state.version, self.state.dirty = m.version, True
                self.state.note(f"up: {m.version} failed half-way, dirty")
                stmt = next(
                    (
                        ln.strip()
                        for ln in m.body.splitlines()
                        if ln.strip() and not ln.strip().startswith("--")
                    ),
                    "",
                )
                lines.append(
                    f"error: migration failed in line 0: {stmt} (details: code: 241, message: Memory limit "
                    "(total) exceeded: would use 3.72 GiB (attempt to allocate chunk of 4194304 bytes), "
                    f"maximum: 3.60 GiB) in database {dsn}"
                )
                return 1, "\n".join(lines) + "\n"
            self.state.version = m.version
            self.state.note(f"up: applied {m.version}_{m.name}")
            lines.append(f"{m.version}/u {m.name} ({_duration(m.name)})")
        return 0, "\n".join(lines) + "\n"


class JobController:
    """batch/v1 Jobs: one pod at a time, replaced on failure up to backoffLimit, then Complete or Failed."""

    def __init__(
        self,
        store: StoreView,
        sup: Supervisor,
        timings: Timings,
        nodes: list[str],
        *,
        kubelet: Kubelet,
        clickhouse: ClickHouseState,
        migrations_mode: str,
        app_url: str,
        work_dir: Path,
    ) -> None:
        self.store = store
        self.timings = timings
        self.nodes = nodes
        self.worker = KeyedWorker(sup, "job", self.reconcile)
        self.app = GitMirror(app_url, Path(work_dir) / "app-repo.git", timeout=timings.subprocess_timeout)
        self.program = MigrateProgram(clickhouse, mode=migrations_mode, app=self.app)
        kubelet.programs.append((self._is_migrate, self.program))
        self._retry_at: dict[tuple[str, str], float] = {}

    @staticmethod
    def _is_migrate(ref: ImageRef) -> bool:
        return ref.repository.rsplit("/", 1)[-1] == MIGRATE_IMAGE

    async def start(self) -> None:
        await self.app.fetch()

    def pod_changed(self, pod: dict[str, Any]) -> None:
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "Job":
                self.worker.schedule((pod["metadata"].get("namespace", "default"), str(ref.get("name"))))

    async def reconcile(self, key: tuple[str, str]) -> None:
        job = await self.store.get("jobs", *key)
        if job is None:
            self._retry_at.pop(key, None)
            return
        status = job.get("status") or {}
        if any(
            c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
            for c in status.get("conditions") or []
        ):
            return
        uid = job["metadata"]["uid"]
        pods = await self.store.list(
            "pods", key[0], label_selector=f"batch.kubernetes.io/controller-uid={uid}"
        )
        phases = [(p.get("status") or {}).get("phase") for p in pods]
        succeeded = phases.count("Succeeded")
        failed = phases.count("Failed")
        active = [p for p, ph in zip(pods, phases, strict=True) if ph not in ("Succeeded", "Failed")]
        spec = job.get("spec") or {}
        completions = int(spec.get("completions") or 1)
        backoff_limit = int(spec.get("backoffLimit", 6))
        now = now_rfc3339()
        conditions = list(status.get("conditions") or [])
        completion_time = status.get("completionTime")

        if succeeded >= completions:
            conditions += [
                _condition(
                    "SuccessCriteriaMet",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                    now,
                ),
                _condition(
                    "Complete", "CompletionsReached", "Reached expected number of succeeded pods", now
                ),
            ]
            completion_time = now
        elif failed > backoff_limit:
            for p in active:
                await self.store.delete("pods", key[0], p["metadata"]["name"])
            active = []
            conditions += [
                _condition(
                    "FailureTarget",
                    "BackoffLimitExceeded",
                    "Job has reached the specified backoff limit",
                    now,
                ),
                _condition(
                    "Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit", now
                ),
            ]
        elif not active:
            loop = asyncio.get_running_loop()
            if failed:
                # the real controller waits 10s · 2^(failures-1) before replacing a failed pod
                due = self._retry_at.setdefault(
                    key, loop.time() + self.timings.job_retry_backoff * 2 ** (failed - 1)
                )
                if loop.time() < due:
                    self.worker.schedule_after(key, due - loop.time())
                    await self._write(
                        key, job, status, active, succeeded, failed, conditions, completion_time
                    )
                    return
            self._retry_at.pop(key, None)
            active.append(await self._create_pod(job))

        await self._write(key, job, status, active, succeeded, failed, conditions, completion_time)

    async def _write(
        self,
        key: tuple[str, str],
        job: dict[str, Any],
        status: dict[str, Any],
        active: list[dict[str, Any]],
        succeeded: int,
        failed: int,
        conditions: list[dict[str, Any]],
        completion_time: str | None,
    ) -> None:
        new: dict[str, Any] = {
            "startTime": status.get("startTime") or now_rfc3339(),
            "active": len(active),
            "ready": sum(pod_is_ready(p) for p in active),
            "succeeded": succeeded,
            "failed": failed,
            "terminating": 0,
            "uncountedTerminatedPods": {},
        }
        for k in ("active", "succeeded", "failed"):
            if not new[k]:
                del new[k]  # omitempty, as the real API serves them
        if conditions:
            new["conditions"] = conditions
        if completion_time:
            new["completionTime"] = completion_time
        if new == status:
            return

        def put(obj: dict[str, Any]) -> None:
            obj["status"] = new

        await self.store.update("jobs", key[0], key[1], put, subresource="status")

    async def _create_pod(self, job: dict[str, Any]) -> dict[str, Any]:
        meta = job["metadata"]
        template = (job.get("spec") or {}).get("template") or {}
        tmeta = template.get("metadata") or {}
        uid, name = meta["uid"], meta["name"]
        labels = {
            **(tmeta.get("labels") or {}),
            "batch.kubernetes.io/controller-uid": uid,
            "batch.kubernetes.io/job-name": name,
            "controller-uid": uid,
            "job-name": name,
        }
        pod_spec = json.loads(json.dumps(template.get("spec") or {}))
        pod_spec.setdefault("restartPolicy", "Never")
        pod_spec["nodeName"] = self.nodes[len(name) % len(self.nodes)]
        obj = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{name}-{rand_suffix()}",
                "namespace": meta.get("namespace", "default"),
                "labels": labels,
                "annotations": dict(tmeta.get("annotations") or {}),
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": name,
                        "uid": uid,
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": pod_spec,
            "status": {"phase": "Pending", "qosClass": "BestEffort"},
        }
        return await self.store.create("pods", obj)


def _condition(ctype: str, reason: str, message: str, now: str) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }
