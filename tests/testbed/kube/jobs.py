"""The simulated Job controller, and what its two kinds of Job run: migrations and in-cluster image builds.

The migrate image is tagged with the app repo's short sha; its migrations are read at that commit from
the app bare remote (database/migrations/NNNNNN_name.up.sql). The container behaves like golang-migrate
behind funnelcake's entrypoint: per-migration lines, `no change`, a half-applied
migration leaving the database dirty, `force X`, and the wrong connection mode timing out on port 9440.

A build Job's kaniko container (gcr.io/kaniko-project/executor) clones the app remote at the init
container's COMMIT, reads the Dockerfile and its stages at that commit, and pushes a synthetic image for
`--custom-platform` to each `--destination` — which only works for this env's own registry, as Workload
Identity grants the builder push rights there and nowhere else. Its log reads like kaniko's.

Simplifications: one pod at a time (parallelism 1, completions 1 by default); restartPolicy OnFailure is
run like Never for the main container (the Job controller replaces the pod; a failed init container is
restarted in place by the kubelet, Init:CrashLoopBackOff, as on GKE); ttlSecondsAfterFinished is ignored, so a finished
Job stays until deleted (the bot deletes it before creating the next one with the same name). The
kubelet runs the `clone` init container first (git clone + checkout of COMMIT): when it fails the pod is
Init:Error, kaniko never starts, and only `kubectl logs -c clone` shows git's message.
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

import aiohttp

from tests.testbed.kube.argocd import CommandError, GitMirror
from tests.testbed.kube.controller import KeyedWorker, now_rfc3339, pod_is_ready, rand_suffix
from tests.testbed.kube.kubelet import NODE_PLATFORM, ImageRef, parse_image
from tests.testbed.kube.scheduler import admit, create_scheduled
from tests.testbed.registry import push_image

if TYPE_CHECKING:
    from tests.testbed.kube.controller import StoreView, Supervisor, Timings
    from tests.testbed.kube.kubelet import EventRecorder, Kubelet

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
        if current and current not in {m.version for m in migrations}:
            # golang-migrate reads the current version's file first: an image older than the database fails
            return 1, f"error: no migration found for version {current}: read down for version {current}\n"
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


# ------------------------------------------------------------------------------------------ image builds

KANIKO_REPOSITORY = "kaniko-project/executor"
WORKSPACE = "/workspace"
# `FROM [--platform=…] base [AS name]`, one per stage (line continuations are not used in FROM lines)
_FROM = re.compile(r"^\s*FROM\s+(?:--\S+\s+)*(?P<base>\S+)(?:\s+AS\s+(?P<name>\S+))?\s*$", re.I)
_INSTRUCTION = re.compile(r"^\s*(?P<op>[A-Za-z]+)\s+(?P<rest>.*)$")
_SUPPORTED_ARCHES = ("amd64", "arm64")


@dataclasses.dataclass(frozen=True)
class Stage:
    index: int
    base: str
    name: str | None
    instructions: tuple[str, ...]


def dockerfile_stages(text: str) -> list[Stage]:
    """The build stages of a Dockerfile, with their instructions (comments and the parser directive dropped)."""
    stages: list[Stage] = []
    current: tuple[str, str | None] | None = None
    body: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _FROM.match(line)
        if m:
            if current is not None:
                stages.append(Stage(len(stages), current[0], current[1], tuple(body)))
            current, body = (m.group("base"), m.group("name")), []
        elif current is not None:
            body.append(line.strip())
    if current is not None:
        stages.append(Stage(len(stages), current[0], current[1], tuple(body)))
    return stages


@dataclasses.dataclass(frozen=True)
class KanikoArgs:
    context: str
    dockerfile: str
    destinations: tuple[str, ...]
    platform: str
    target: str | None


def parse_kaniko_args(args: list[str]) -> KanikoArgs:
    values: dict[str, list[str]] = {}
    for arg in args:
        key, _, value = arg.partition("=")
        values.setdefault(key.lstrip("-"), []).append(value)

    def one(key: str, default: str) -> str:
        return (values.get(key) or [default])[-1]

    return KanikoArgs(
        context=one("context", f"dir://{WORKSPACE}"),
        dockerfile=one("dockerfile", f"{WORKSPACE}/Dockerfile"),
        destinations=tuple(values.get("destination") or ()),
        platform=one("custom-platform", "/".join(NODE_PLATFORM)),
        target=values["target"][-1] if values.get("target") else None,
    )


@dataclasses.dataclass(frozen=True)
class BuiltImage:
    """One image a build pushed (for tests and the demo: what landed where)."""

    destination: str
    digest: str
    commit: str
    platform: str


class _Failed(Exception):
    """The build stopped: the container's exit code and its last words."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class BuildProgram:
    """What the kaniko container of a build Job does: clone at COMMIT, build the target, push if allowed."""

    def __init__(
        self,
        *,
        app: GitMirror,
        app_url: str,
        store: StoreView,
        registry_url: str,
        registry_host: str,
        delay: float,
    ) -> None:
        self.app = app
        self.app_url = app_url
        self.store = store
        self.registry_url = registry_url.rstrip("/")
        self.registry_host = registry_host
        self.delay = delay  # how long the "build" takes before the push (tests: tens of ms)
        self.built: list[BuiltImage] = []

    @staticmethod
    def matches(ref: ImageRef) -> bool:
        return ref.repository == KANIKO_REPOSITORY

    async def __call__(
        self, pod: dict[str, Any], container: dict[str, Any], env: dict[str, str]
    ) -> tuple[int, str]:
        args = parse_kaniko_args([str(a) for a in container.get("args") or []])
        log_lines: list[str] = []
        try:
            sha = await self._clone(pod)
            return 0, await self._build(args, sha, log_lines)
        except _Failed as e:
            return e.code, "".join(f"{ln}\n" for ln in log_lines) + e.text

    @staticmethod
    def is_clone(container: dict[str, Any]) -> bool:
        return any(e.get("name") == "COMMIT" for e in container.get("env") or [])

    async def clone_step(
        self, pod: dict[str, Any], container: dict[str, Any], env: dict[str, str]
    ) -> tuple[int, str]:
        """The `clone` init container: git clone + checkout of COMMIT; git's exit code and message."""
        try:
            await self._clone(pod)
        except _Failed as e:
            return e.code, e.text
        return 0, ""

    async def _clone(self, pod: dict[str, Any]) -> str:
        """The init container's `git clone` + `git checkout --detach $COMMIT`; the full sha checked out."""
        spec = pod.get("spec") or {}
        clone = next(
            (
                c
                for c in spec.get("initContainers") or []
                if any(e.get("name") == "COMMIT" for e in c.get("env") or [])
            ),
            None,
        )
        if clone is None:
            raise _Failed(
                1,
                "Error: error resolving dockerfile path: please provide a valid path to a Dockerfile "
                "within the build context with --dockerfile\n",
            )
        values = {str(e.get("name")): str(e.get("value", "")) for e in clone.get("env") or []}
        url, commit = values.get("REPO_URL", ""), values.get("COMMIT", "")
        ns, name = pod["metadata"].get("namespace", "default"), pod["metadata"]["name"]
        failure: str | None = None
        if url != self.app_url:
            failure = f"fatal: repository '{url}' does not exist\n"
        else:
            try:
                await self.app.fetch()
                sha = await self.app.resolve(commit)
            except CommandError:
                failure = f"fatal: reference is not a tree: {commit}\n"
        if failure is not None:
            await self.store.set_log(ns, name, str(clone.get("name", "clone")), failure)
            raise _Failed(128, failure)
        await self.store.set_log(ns, name, str(clone.get("name", "clone")), "")
        return sha

    async def _build(self, args: KanikoArgs, sha: str, out: list[str]) -> str:
        clock = _KanikoClock()
        if not args.destinations:
            raise _Failed(1, "Error: you must provide --destination, or use --no-push\n")
        refs = []
        for dest in args.destinations:
            ref = parse_image(dest)
            if ref is None:
                raise _Failed(1, f"Error: error parsing destination {dest!r}: invalid reference format\n")
            refs.append(ref)
        # kaniko checks it may push before it builds anything
        for ref in refs:
            if ref.host != self.registry_host:
                raise _Failed(
                    1,
                    "error checking push permissions -- make sure you entered the correct tag name, and "
                    "that you are authenticated correctly, and try again: checking push permission for "
                    f'"{ref.raw}": POST https://{ref.host}/v2/{ref.repository}/blobs/uploads/: DENIED: '
                    f'Permission "artifactregistry.repositories.uploadArtifacts" denied on resource '
                    f'"{ref.repository.rsplit("/", 1)[0]}" (or it may not exist)\n',
                )
        os_name, _, arch = args.platform.partition("/")
        if os_name != "linux" or arch not in _SUPPORTED_ARCHES:
            raise _Failed(1, f"Error: error building image: unsupported platform {args.platform!r}\n")
        context = args.context.removeprefix("dir://").rstrip("/")
        if not (context == WORKSPACE or context.startswith(f"{WORKSPACE}/")):
            raise _Failed(1, f"Error: error resolving source context: {context} is not in the workspace\n")
        rel_context = context.removeprefix(WORKSPACE).strip("/")
        if rel_context and not await self._ls(sha, rel_context):
            raise _Failed(1, f"Error: error building image: context directory {context} does not exist\n")
        rel_dockerfile = args.dockerfile.removeprefix(f"{WORKSPACE}/")
        try:
            dockerfile = await self.app.show(sha, rel_dockerfile)
        except CommandError:
            raise _Failed(
                1,
                "Error: error resolving dockerfile path: please provide a valid path to a Dockerfile "
                "within the build context with --dockerfile\n",
            ) from None
        stages = dockerfile_stages(dockerfile)
        if not stages:
            raise _Failed(1, "Error: error building image: parsing dockerfile: file with no instructions\n")
        if args.target is None:
            last = len(stages) - 1
        else:
            last = next((s.index for s in stages if s.name == args.target), -1)
            if last < 0:
                raise _Failed(
                    1,
                    "Error: error building image: parsing dockerfile: "
                    f'target stage "{args.target}" could not be found\n',
                )
        names = {s.name for s in stages if s.name}
        for stage in stages[: last + 1]:
            if stage.base not in names and stage.base != "scratch":
                out.append(clock.line(f"Retrieving image manifest {stage.base}"))
                out.append(clock.line(f"Retrieving image {stage.base} from registry index.docker.io"))
        for stage in stages[: last + 1]:
            base_idx = next((s.index for s in stages if s.name == stage.base), -1)
            out.append(
                clock.line(f"Building stage '{stage.base}' [idx: '{stage.index}', base-idx: '{base_idx}']")
            )
            out.append(clock.line("Executing 0 build triggers"))
            for instruction in stage.instructions:
                out.append(clock.line(instruction, step=1))
            out.append(clock.line("Taking snapshot of full filesystem...", step=1))
        await asyncio.sleep(self.delay)
        for ref in refs:
            out.append(clock.line(f"Pushing image to {ref.raw}", at=max(clock.now, 12)))
            try:
                digest = await push_image(
                    self.registry_url,
                    ref.repository,
                    ref.tag or "latest",
                    "amd64" if arch == "amd64" else "arm64",
                    seed=f"build:{ref.binary}@{sha}",
                )
            except (aiohttp.ClientError, TimeoutError, RuntimeError) as e:
                raise _Failed(
                    1, f"error pushing image: failed to push to destination {ref.raw}: {e}\n"
                ) from None
            # kaniko names what it pushed by repository and digest, the tag dropped
            out.append(clock.line(f"Pushed {ref.host}/{ref.repository}@{digest}", step=3))
            self.built.append(BuiltImage(ref.raw, digest, sha, args.platform))
        return "".join(f"{ln}\n" for ln in out)

    async def _ls(self, sha: str, directory: str) -> list[str]:
        try:
            return await self.app.ls(sha, directory)
        except CommandError:
            return []


class _KanikoClock:
    """kaniko's `INFO[0012]` prefix: seconds since the executor started (made up, but increasing)."""

    def __init__(self) -> None:
        self.now = 0

    def line(self, text: str, *, step: int = 0, at: int | None = None) -> str:
        self.now = at if at is not None else self.now + step
        return f"INFO[{self.now:04d}] {text}"


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
        events: EventRecorder,
        clickhouse: ClickHouseState,
        migrations_mode: str,
        app_url: str,
        work_dir: Path,
    ) -> None:
        self.store = store
        self.timings = timings
        self.nodes = nodes
        self.events = events
        self.worker = KeyedWorker(sup, "job", self.reconcile)
        self.app = GitMirror(app_url, Path(work_dir) / "app-repo.git", timeout=timings.subprocess_timeout)
        self.program = MigrateProgram(clickhouse, mode=migrations_mode, app=self.app)
        kubelet.programs.append((self._is_migrate, self.program))
        # a build "takes" a few Job run times, so its progress can be watched in the demo
        self.builds = BuildProgram(
            app=self.app,
            app_url=app_url,
            store=store,
            registry_url=kubelet.registry_url,
            registry_host=kubelet.registry_host,
            delay=timings.job_run * 3,
        )
        kubelet.programs.append((BuildProgram.matches, self.builds))
        kubelet.init_programs.append((BuildProgram.is_clone, self.builds.clone_step))
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
        if job["metadata"].get("deletionTimestamp"):
            return  # being deleted (foreground): the controller starts nothing new for it
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
            created = await self._create_pod(job)
            if created is None:
                # admission refused the pod: the controller retries with its back-off
                self.worker.schedule_after(key, self.timings.job_retry_backoff * 10)
            else:
                active.append(created)

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

    async def _create_pod(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """The Job's next pod through admission and the scheduler; None (and FailedCreate) when refused."""
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
        obj: dict[str, Any] = {
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
        ns = meta.get("namespace", "default")
        accounts = {sa["metadata"]["name"] for sa in await self.store.list("serviceaccounts", ns)}
        refused = admit({**obj, "metadata": {**obj["metadata"], "generateName": f"{name}-"}}, accounts)
        if refused is not None:
            await self.events.record(
                job, "FailedCreate", f"Error creating: {refused}", component="job-controller", warning=True
            )
            return None
        return await create_scheduled(self.store, self.events, obj, self.nodes, pick=len(name))


def _condition(ctype: str, reason: str, message: str, now: str) -> dict[str, Any]:
    return {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": now,
        "lastTransitionTime": now,
    }
