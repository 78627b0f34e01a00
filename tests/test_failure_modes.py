"""One end-to-end test per runbook failure mode (F1-F11), plus concurrent deploys and rollback.

Each test drives the real deploy service (bot.wiring.build_service) against the full sandbox: real
registries, real git remotes, the simulated clusters and the live staging site. Assertions are about what
a user would notice: the deploy's state and message, the hint, and the cluster and git as they end up.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from bot.adapters.argocd import parse_time
from bot.adapters.registry import BasicCredentials, DefaultCredentials, RegistryClient
from bot.drift import build_report
from bot.ledger.models import DeployKind, DeployRecord, DeployState
from bot.models import AMD64
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Pipeline, StepEvent, StepOutcome
from bot.pipeline.steps.rollout import Rollout
from bot.pipeline.steps.sync import Sync
from bot.pipeline.vocab import EventKind
from bot.service import DeployService
from bot.wiring import build_service
from tests.testbed.events import Events
from tests.testbed.gitrepos import git_out, overlay_path, push_from_second_clone, remote_file, remote_head
from tests.testbed.kube.jobs import MIGRATE_IMAGE
from tests.testbed.registry import Kind
from tests.testbed.sandbox import Sandbox
from tests.testbed.tokenauth import TokenServer

IMAGES = ("funnelcake-api", "funnelcake-relay", MIGRATE_IMAGE)
SERVICES = ("funnelcake-api", "funnelcake-relay")
ALICE, BOB = "U0ALICE", "U0BOB"

# ---- helpers -------------------------------------------------------------------------------------


def parts(sandbox: Sandbox) -> tuple[Any, Any]:
    assert sandbox.git is not None
    assert sandbox.clusters is not None
    return sandbox.git, sandbox.clusters


async def publish(
    sandbox: Sandbox, env: str, tag: str, kind: Kind = "multi", images: tuple[str, ...] = IMAGES
) -> dict[str, str]:
    """What CI does: push the commit's images to one registry; returns image -> digest."""
    digests = await asyncio.gather(
        *(sandbox.registries.push(env, image, tag, kind, seed=f"{image}:{tag}") for image in images)
    )
    return dict(zip(images, digests, strict=True))


async def deploy(
    svc: DeployService, env: str | list[str], ref: str, who: str = ALICE, *, allow_downgrade: bool = False
) -> DeployRecord:
    envs = [env] if isinstance(env, str) else env
    started = await svc.start(DeployKind.DEPLOY, envs, ref, who, allow_downgrade=allow_downgrade)
    return await svc.wait(started.record.id)


def live_image(sandbox: Sandbox, env: str, deployment: str) -> str:
    _, clusters = parts(sandbox)
    dep = clusters[env].store.get("deployments", "funnelcake", deployment)
    assert dep is not None
    return str(dep["spec"]["template"]["spec"]["containers"][0]["image"])


def overlay_tag(sandbox: Sandbox, env: str, service: str) -> str:
    git, _ = parts(sandbox)
    text = remote_file(git.gitops.path, overlay_path(service, env)).decode()
    tags = re.findall(r"newTag:\s*[\"']?([0-9a-zA-Z._-]+)", text)
    return str(tags[-1])  # staging's relay overlay pins a sidecar first; funnelcake's entry is last


def app(sandbox: Sandbox, env: str, name: str) -> dict[str, Any]:
    _, clusters = parts(sandbox)
    obj = clusters[env].store.get("applications", "argocd", name)
    assert obj is not None
    return obj


def set_relay_tag(tag: str) -> Callable[[str], str]:
    """A colleague's hand edit of an overlay: replace funnelcake-relay's newTag, keep everything else."""

    def edit(text: str) -> str:
        new, n = re.subn(r'(newTag:\s*)"?[0-9a-f]{7}"?', rf'\g<1>"{tag}"', text)
        assert n == 1, text
        return new

    return edit


# ---- F1 ------------------------------------------------------------------------------------------


async def test_f1_tag_deleted_after_images_step_never_reaches_git(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    git, _ = parts(sandbox)
    short = git.app.short("head")
    old = git.app.short("api-paginate")
    await publish(sandbox, "production", short)
    gitops_before = remote_head(git.gitops.path)
    deleted: list[str] = []

    async def delete_after_images(event: StepEvent) -> None:
        # Someone cleans up the poc registry between the images step and the push.
        if event.step == "images" and event.kind is EventKind.DONE and not deleted:
            deleted.append(await sandbox.registries.delete_tag("poc", "funnelcake-relay", short))

    events.hooks.append(delete_after_images)
    record = await deploy(svc, "poc", short)

    assert deleted, "the images step never finished"
    assert record.state is DeployState.FAILED
    assert record.message is not None
    assert record.message.startswith("gitops: refusing to touch git"), record.message
    assert f"{sandbox.registries.prefix('poc')}/funnelcake-relay:{short} (not found)" in record.message
    assert "Nothing was pushed" in (events.summary(record.id)["hint"] or "")
    # git, Argo CD and the cluster are exactly as they were
    assert remote_head(git.gitops.path) == gitops_before
    assert overlay_tag(sandbox, "poc", "relay") == old
    assert "sync" not in events.steps(record.id, EventKind.STARTED)
    assert live_image(sandbox, "poc", "funnelcake-relay").endswith(f":{old}")


# ---- F2 ------------------------------------------------------------------------------------------


async def test_f2_deploy_refreshes_and_syncs_the_envs_own_argocd(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    git, _ = parts(sandbox)
    short = git.app.short("head")
    await publish(sandbox, "production", short)
    others = {(env, name): app(sandbox, env, name) for env in ("production", "staging") for name in SERVICES}

    record = await deploy(svc, "poc", short, ALICE)

    assert record.state is DeployState.SUCCEEDED, record.message
    pushed = remote_head(git.gitops.path)
    assert events.one(record.id, "gitops", EventKind.DONE).data["commit"] == pushed
    assert events.one(record.id, "sync", EventKind.DONE).data["revision"] == pushed
    assert events.summary(record.id)["revision"] == pushed
    for name in SERVICES:
        obj = app(sandbox, "poc", name)
        state = obj["status"]["operationState"]
        assert state["phase"] == "Succeeded"
        assert state["operation"]["initiatedBy"]["username"] == ALICE
        assert state["syncResult"]["revision"] == pushed
        assert obj["status"]["sync"] == {**obj["status"]["sync"], "status": "Synced", "revision": pushed}
        assert obj["status"]["health"]["status"] == "Healthy"
        # the status was reconciled after the sync finished (Argo CD learns a new revision only by a refresh),
        # the refresh annotation consumed, no operation left behind
        finished, reconciled = parse_time(state["finishedAt"]), parse_time(obj["status"]["reconciledAt"])
        assert finished is not None and reconciled is not None and reconciled >= finished
        assert "argocd.argoproj.io/refresh" not in (obj["metadata"].get("annotations") or {})
        assert "operation" not in obj
    # The push moved main, yet no other env's Argo CD did anything: a push alone deploys nothing.
    for (env, name), before in others.items():
        after = app(sandbox, env, name)
        assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], (env, name)
        assert after["status"]["operationState"]["operation"]["initiatedBy"]["username"] == "platform-team"
        assert after["status"]["operationState"]["syncResult"]["revision"] != pushed
        assert not live_image(sandbox, env, name).endswith(f":{short}")


# ---- F3 ------------------------------------------------------------------------------------------


async def test_f3_rollout_reports_ready_pods_live_image_and_the_site(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    git, clusters = parts(sandbox)
    assert sandbox.site is not None
    short = git.app.short("head")
    prefix = sandbox.registries.prefix("staging")
    await publish(sandbox, "production", short)

    record = await deploy(svc, "staging", short)

    assert record.state is DeployState.SUCCEEDED, record.message
    progress = [e.message for e in events.of(record.id, "rollout", EventKind.PROGRESS)]
    for name in SERVICES:
        dep = clusters["staging"].store.get("deployments", "funnelcake", name)
        assert dep is not None
        replicas = dep["spec"]["replicas"]
        assert f"staging/{name}: {replicas}/{replicas} ready" in progress, progress
        # the pods really run the new image and are Ready
        pods, _ = clusters["staging"].store.list("pods", "funnelcake")
        mine = [
            p
            for p in pods
            if p["spec"]["containers"][0]["image"] == f"{prefix}/{name}:{short}"
            and not p["metadata"].get("deletionTimestamp")
        ]
        assert len(mine) == replicas
        for pod in mine:
            assert pod["status"]["phase"] == "Running"
            ready = {c["type"]: c["status"] for c in pod["status"]["conditions"]}
            assert ready["Ready"] == "True"
    rollout = events.one(record.id, "rollout", EventKind.DONE).data["staging"]
    assert {r[0] for r in rollout} == set(SERVICES)
    for deployment, ready, total, images in rollout:
        assert ready == total > 0
        # staging's relay also runs a pinned statsd-exporter sidecar
        ours = {i for i in images.values() if "/funnelcake-" in i}
        assert ours == {f"{prefix}/{deployment}:{short}"}, images
    verify = events.one(record.id, "verify", EventKind.DONE).data
    assert verify["live"]["staging"] == {
        "api": f"{prefix}/funnelcake-api:{short}",
        "relay": f"{prefix}/funnelcake-relay:{short}",
    }
    assert list(verify["sites"]["staging"]) == ["ok", f"{sandbox.site.url} answers and shows {short}"]
    async with aiohttp.ClientSession() as http, http.get(sandbox.site.url) as resp:
        assert f"version: {short}" in await resp.text()

    # Pods that never start are noticed by the bot, not left for someone to find: a crash-looping build.
    crashing = git.app.short("relay-tune")
    clusters["staging"].crash_tags.add(crashing)
    await publish(sandbox, "production", crashing, images=SERVICES)  # already there: same digests
    failed = await deploy(svc, "staging", crashing, allow_downgrade=True)  # back from head: confirmed
    assert failed.state is DeployState.FAILED
    assert failed.message is not None and failed.message.startswith("rollout: "), failed.message
    diagnosis = events.summary(failed.id)["failure"]["diagnosis"]
    assert diagnosis["kind"] == "crash-loop", diagnosis
    assert "verify" not in events.steps(failed.id, EventKind.STARTED)


# ---- F4 ------------------------------------------------------------------------------------------


async def test_f4_arm64_images_are_caught_before_and_after_the_deploy(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    git, clusters = parts(sandbox)
    short = git.app.short("head")

    # An arm64-only build (a Mac's default) in every registry: nothing to promote, it must be built.
    for env in ("production", "staging", "poc"):
        await publish(sandbox, env, short, "arm64")
    plan, result = await svc.plan(["poc"], short, ALICE)
    assert result.ok, result.failed
    assert plan is not None
    actions = {(i.image, i.action) for i in plan.images()}
    assert actions == {(image, "build") for image in IMAGES}
    assert all(i.note == "poc registry has it for linux/arm64 only" for i in plan.images())
    builder, svc.deps.builder = svc.deps.builder, None
    try:
        plan, result = await svc.plan(["poc"], short, ALICE)
    finally:
        svc.deps.builder = builder
    assert result.failed is not None and result.failed.step == "preflight"
    assert (
        f"funnelcake-api:{short} is in no environment's registry and this bot has no builder configured"
        in (result.failed.message)
    )

    # CI then pushed the right (multi-arch) build to production: poc's arm64 copy is overwritten by promotion.
    digests = await publish(sandbox, "production", short, "multi")
    record = await deploy(svc, "poc", short)
    assert record.state is DeployState.SUCCEEDED, record.message
    promoted = [e.message for e in events.of(record.id, "images", EventKind.PROGRESS)]
    for image in IMAGES:
        assert f"poc/{image}:{short} promoted from production" in promoted
        status = await svc.deps.registry.check(sandbox.registries.prefix("poc"), image, short, AMD64)
        assert status.ok and status.digest == digests[image]
        assert "linux/amd64" in status.platforms
    assert live_image(sandbox, "poc", "funnelcake-relay").endswith(f":{short}")

    # Someone edits the overlay by hand to an arm64-only tag and syncs: the rollout fails fast, diagnosed.
    arm = git.app.short("initial")
    await publish(sandbox, "poc", arm, "arm64", images=("funnelcake-relay",))
    await asyncio.to_thread(
        push_from_second_clone,
        git.gitops.url,
        overlay_path("relay", "poc"),
        set_relay_tag(arm),
        "poc: try the build from my laptop",
    )
    ctx = DeployContext(svc.deps, "hand-edit", DeployKind.DEPLOY, [svc.config.env("poc")], arm, BOB)
    began = time.monotonic()
    result = await Pipeline("hand-edit", [Sync(), Rollout()], [events]).run(ctx)
    elapsed = time.monotonic() - began
    assert [r.outcome for r in result.results] == [StepOutcome.OK, StepOutcome.FAILED]
    assert elapsed < svc.config.timeouts.rollout / 2, f"took {elapsed:.1f}s: waited instead of failing fast"
    failed = result.results[-1]
    diagnosis = failed.data["diagnosis"]
    assert failed.data["deployment"] == "funnelcake-relay"
    assert diagnosis["kind"] == "wrong-platform"
    assert "no linux/amd64" in diagnosis["cause"] and "linux/arm64" in diagnosis["cause"]
    assert "no match for platform in manifest" in diagnosis["evidence"]
    assert "--platform linux/amd64" in diagnosis["fix"]
    assert failed.hint is not None and "--platform linux/amd64" in failed.hint
    assert live_image(sandbox, "poc", "funnelcake-relay").endswith(f":{arm}")
    assert not clusters["poc"].errors


# ---- F5 ------------------------------------------------------------------------------------------


async def test_f5_registry_auth_failure_names_the_registry_and_the_identity(sandbox: Sandbox) -> None:
    git, _ = parts(sandbox)
    assert sandbox.config is not None
    short = git.app.short("head")
    await publish(sandbox, "production", short)
    gitops_before = remote_head(git.gitops.path)
    poc = sandbox.registries["poc"]
    host = poc.host
    async with TokenServer() as tokens:
        # poc's registry now wants tokens (as Artifact Registry does); anonymous callers may only pull.
        await poc.stop()
        poc.token_server = tokens
        await poc.start()
        assert poc.host == host
        events = Events()
        async with build_service(sandbox.settings(), sandbox.config, reporters=lambda r: [events]) as svc:
            # The bot has no credential for this registry: it can read, so preflight plans a promotion,
            # and the push is refused.
            record = await deploy(svc, "poc", short)
            assert record.state is DeployState.FAILED
            assert record.message is not None
            # the failure says why the images step was promoting at all
            why = rf"images: poc/funnelcake-[a-z]+:{short}: missing from the poc registry, so promoting from production: "
            assert re.match(rf"{why}registry {re.escape(host)} denied push", record.message), record.message
            assert "for anonymous" in record.message
            assert f"Registry {host} needs credentials" in (events.summary(record.id)["hint"] or "")

            # A wrong credential is named too (never its secret), and stops the deploy at preflight.
            wrong = BasicCredentials("oauth2accesstoken", "ya29.expired-token")
            async with RegistryClient(credentials=DefaultCredentials({host: wrong})) as client:
                right, svc.deps.registry = svc.deps.registry, client
                try:
                    refused = await deploy(svc, "poc", short)
                finally:
                    svc.deps.registry = right
            assert refused.state is DeployState.FAILED
            assert refused.message is not None
            assert refused.message.startswith("preflight: "), refused.message
            assert f"registry {host} token service refused basic user oauth2accesstoken (HTTP 401)" in (
                refused.message
            )
            assert "ya29.expired-token" not in refused.message
            assert all("ya29.expired-token" not in e.message for e in events.events)
    # nothing reached git
    assert remote_head(git.gitops.path) == gitops_before


# ---- F6 ------------------------------------------------------------------------------------------


async def test_f6_a_push_landing_first_is_rebased_onto_and_both_commits_stay(
    sandbox: Sandbox, service: tuple[DeployService, Events], monkeypatch: pytest.MonkeyPatch
) -> None:
    svc, events = service
    git, _ = parts(sandbox)
    short = git.app.short("head")
    await publish(sandbox, "production", short)
    gitops = svc.deps.gitops
    commit = gitops._commit
    theirs: list[str] = []

    def commit_then_race(files: list[str], message: str) -> None:
        # The bot has fetched and is committing: a colleague pushes now, so our first push is rejected.
        commit(files, message)
        if not theirs:
            theirs.append(
                push_from_second_clone(
                    git.gitops.url,
                    "README.md",
                    lambda text: text + "\nOn-call: see the runbook.\n",
                    "docs: on-call pointer",
                )
            )

    monkeypatch.setattr(gitops, "_commit", commit_then_race)
    record = await deploy(svc, "poc", short)

    assert record.state is DeployState.SUCCEEDED, record.message
    assert theirs
    gitops_done = events.one(record.id, "gitops", EventKind.DONE).data
    assert gitops_done["attempts"] == 2
    head = remote_head(git.gitops.path)
    assert gitops_done["commit"] == head
    # ours on top of theirs: nothing lost, history linear
    log = git_out(git.gitops.path, "log", "--format=%H %s", "-3", "main").splitlines()
    assert log[0] == f"{head} deploy(poc): funnelcake @ {short}"
    assert log[1] == f"{theirs[0]} docs: on-call pointer"
    assert b"On-call: see the runbook." in remote_file(git.gitops.path, "README.md")
    assert overlay_tag(sandbox, "poc", "relay") == short
    assert live_image(sandbox, "poc", "funnelcake-api").endswith(f":{short}")


# ---- F7 ------------------------------------------------------------------------------------------


async def test_f7_dirty_migration_stops_then_guarded_force_recovers(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    git, clusters = parts(sandbox)
    broken = git.app.short("broken")
    await publish(sandbox, "staging", broken, "amd64")
    gitops_before = remote_head(git.gitops.path)
    clickhouse = clusters["staging"].clickhouse
    assert (clickhouse.version, clickhouse.dirty) == (3, False)

    record = await deploy(svc, "staging", "broken-migration")

    assert record.state is DeployState.FAILED
    assert record.message is not None and record.message.startswith("migrate: "), record.message
    summary = events.summary(record.id)
    assert summary["failed_step"] == "migrate"
    failure = summary["failure"]
    assert failure["dirty_version"] == 4
    assert failure["outcome"] == "dirty"
    assert "Dirty database version 4" in record.message
    assert "error: Dirty database version 4. Fix and force version." in failure["log"]
    assert "run the guarded `force 4` and `up` again" in (summary["hint"] or "")
    assert (clickhouse.version, clickhouse.dirty) == (4, True)
    # it stopped before git
    assert remote_head(git.gitops.path) == gitops_before
    assert "gitops" not in events.steps(record.id, EventKind.STARTED)

    forced = await svc.start_force("staging", failure["dirty_version"], BOB)
    done = await svc.wait(forced.record.id)
    assert done.state is DeployState.SUCCEEDED, done.message
    assert done.kind is DeployKind.FORCE_MIGRATE
    progress = [e.message for e in events.of(done.id, "force-migrate", EventKind.PROGRESS)]
    assert progress[0] == "staging: forced version 4"
    assert progress[1].startswith("staging: up → ")
    assert events.one(done.id, "force-migrate", EventKind.DONE).data["forced"] == 4
    assert clickhouse.dirty is False
    assert clickhouse.version == 4
    assert any(h.endswith("force 4") for h in clickhouse.history)


# ---- F8 ------------------------------------------------------------------------------------------


async def test_f8_the_migration_mode_comes_from_each_envs_config(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    git, clusters = parts(sandbox)
    short = git.app.short("head")
    await publish(sandbox, "production", short)
    feeds = {env: clusters[env].store.subscribe() for env in ("production", "staging", "poc")}
    try:
        prod = await svc.start(DeployKind.MIGRATE, ["production"], short, ALICE)
        others = [await svc.start(DeployKind.MIGRATE, [env], short, ALICE) for env in ("staging", "poc")]
        waiting = await svc.wait(prod.record.id)
        assert waiting.state is DeployState.AWAITING_APPROVAL, waiting.message
        await svc.decide(prod.record.id, BOB, approve=True)
        records = [await svc.wait(s.record.id) for s in (prod, *others)]
        jobs: dict[str, list[dict[str, Any]]] = {}
        for env, feed in feeds.items():
            while not feed.empty():
                kind, resource, obj = feed.get_nowait()
                if resource == "jobs" and kind == "ADDED":
                    jobs.setdefault(env, []).append(obj)
    finally:
        for env, feed in feeds.items():
            clusters[env].store.unsubscribe(feed)

    for record in records:
        assert record.state is DeployState.SUCCEEDED, (record.envs, record.message)
        env = record.envs[0]
        mode = events.one(record.id, "migrate", EventKind.DONE).data[env]["mode"]
        assert mode == ("cloud" if env == "production" else "self-hosted")
    for env in ("production", "staging", "poc"):
        assert jobs.get(env), f"no migrate Job was created in {env}"
        for job in jobs[env]:
            assert job["metadata"]["name"] == "funnelcake-db-migrate"
            container = job["spec"]["template"]["spec"]["containers"][0]
            assert container["image"] == f"{sandbox.registries.prefix(env)}/{MIGRATE_IMAGE}:{short}"
            assert not container.get("envFrom"), "the whole secret would bring CLICKHOUSE_URL along"
            variables = {v["name"]: v for v in container.get("env") or []}
            if env == "production":
                assert variables["CLICKHOUSE_URL"]["valueFrom"]["secretKeyRef"] == {
                    "name": "funnelcake-clickhouse-credentials",
                    "key": "CLICKHOUSE_URL",
                }
                assert "CLICKHOUSE_HOST" not in variables
            else:
                assert "CLICKHOUSE_URL" not in variables
                assert variables["CLICKHOUSE_HOST"]["value"] == (
                    "funnelcake-funnelcake-clickhouse.funnelcake.svc.cluster.local"
                )
                assert variables["CLICKHOUSE_PORT"]["value"] == "9000"
            for key in ("CLICKHOUSE_USER", "CLICKHOUSE_PASSWORD", "CLICKHOUSE_DATABASE"):
                assert variables[key]["valueFrom"]["secretKeyRef"]["key"] == key
        assert clusters[env].clickhouse.dirty is False


# ---- F9 ------------------------------------------------------------------------------------------


async def test_f9_unknown_or_ambiguous_commit_is_refused_at_resolve(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    git, _ = parts(sandbox)
    gitops_before = remote_head(git.gitops.path)
    head = git.app.short("head")
    typo = head[:6] + ("0" if head[6] != "0" else "1")

    record = await deploy(svc, "poc", typo)
    assert record.state is DeployState.FAILED
    assert (
        record.message
        == f"resolve: {typo!r} is not a commit, branch or tag of divine-funnelcake (fetched just now)."
    )
    hint = events.summary(record.id)["hint"] or ""
    assert hint.startswith("Did you mean ") and f"{head} (api: add /healthz for the load balancer)" in hint
    assert events.steps(record.id, EventKind.STARTED) == ["resolve"]

    _, result = await svc.plan(["poc"], "broken-migratoin", ALICE)
    assert result.failed is not None and result.failed.step == "resolve"
    assert result.failed.hint is not None and "broken-migration" in result.failed.hint

    a, b = git.app.commits["collision-a"], git.app.commits["collision-b"]
    assert a[:7] == b[:7]
    record = await deploy(svc, "poc", a[:7])
    assert record.state is DeployState.FAILED
    assert record.message is not None
    assert f"{a[:7]!r} matches 2 commits in divine-funnelcake" in record.message
    width = next(n for n in range(8, 41) if a[:n] != b[:n])
    assert f"{a[:width]} docs: relay tuning notes (A)" in record.message
    assert f"{b[:width]} docs: relay tuning notes (B)" in record.message
    assert "Give more characters of the hash" in (events.summary(record.id)["hint"] or "")
    # a longer prefix is enough
    plan, result = await svc.plan(["poc"], a[:width], ALICE)
    assert plan is not None and plan.commit.sha == a
    assert remote_head(git.gitops.path) == gitops_before


# ---- F10 -----------------------------------------------------------------------------------------


async def test_f10_image_pull_denied_is_diagnosed_as_registry_auth_with_the_node_sa_fix(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    git, clusters = parts(sandbox)
    prod_tag = git.app.short("relay-tune")
    prefix = sandbox.registries.prefix("staging")
    clusters["staging"].deny_registry_pulls = True  # the nodes' service account lost its reader role

    began = time.monotonic()
    record = await deploy(svc, "staging", prod_tag)
    elapsed = time.monotonic() - began

    assert record.state is DeployState.FAILED
    assert record.message is not None and record.message.startswith("rollout: "), record.message
    assert elapsed < svc.config.timeouts.rollout, "waited for the rollout limit instead of failing fast"
    summary = events.summary(record.id)
    diagnosis = summary["failure"]["diagnosis"]
    assert diagnosis["kind"] == "registry-auth"
    assert re.search(r"\b(401 Unauthorized|403 Forbidden)\b", diagnosis["cause"]), diagnosis
    assert f"the staging nodes are not allowed to pull from {prefix}" in diagnosis["cause"]
    assert re.search(r"401|403", diagnosis["evidence"])
    assert "gcloud artifacts repositories add-iam-policy-binding" in diagnosis["fix"]
    assert "--role=roles/artifactregistry.reader" in diagnosis["fix"]
    assert diagnosis["promote_from"] == []
    assert summary["rollback_to"] == {"staging": git.app.short("add-index")}
    # the status report shows the same cause and offers the rollback
    report = await build_report(svc.deps)
    staging = [f for f in report.findings if f.env == "staging" and f.action == "rollback:staging"]
    assert staging and "not allowed to pull" in staging[0].text


# ---- F11 -----------------------------------------------------------------------------------------


async def test_f11_status_shows_envs_behind_production_and_catch_up_clears_it(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, _ = service
    git, _ = parts(sandbox)
    prod = git.app.short("relay-tune")
    staging_tag, poc_tag = git.app.short("add-index"), git.app.short("api-paginate")

    report = await svc.status()
    behind = {f.env: f for f in report.findings if "behind production" in f.text}
    assert behind["staging"].text == f"staging is 1 commit behind production ({staging_tag} → {prod})"
    assert behind["staging"].action == f"catchup:staging:{prod}"
    assert behind["poc"].text == f"poc is 2 commits behind production ({poc_tag} → {prod})"
    assert "production" not in behind
    envs = {e.env: e for e in report.envs}
    assert [c.short for c in envs["staging"].behind] == [prod]
    assert [c.short for c in envs["poc"].behind] == [prod, staging_tag]

    # the one-click catch-up: deploy production's tag to staging
    _, _, tag = (behind["staging"].action or "").split(":")
    record = await deploy(svc, "staging", tag)
    assert record.state is DeployState.SUCCEEDED, record.message

    report = await svc.status()
    behind = {f.env: f for f in report.findings if "behind production" in f.text}
    assert "staging" not in behind
    assert behind["poc"].text == f"poc is 2 commits behind production ({poc_tag} → {prod})"
    staging = next(e for e in report.envs if e.env == "staging")
    assert staging.behind == []
    assert all(row.overlay_tag == row.live_tag == prod and row.healthy for row in staging.rows), staging.rows
    assert staging.site is not None and staging.site.endswith(f"shows {prod}")
    assert not [f for f in report.findings if f.env == "staging" and f.severity in ("warn", "error")]


# ---- concurrency and rollback --------------------------------------------------------------------


async def test_concurrent_deploys_and_rollback(
    sandbox: Sandbox, service: tuple[DeployService, Events]
) -> None:
    svc, events = service
    git, _ = parts(sandbox)
    short = git.app.short("head")
    before = git.app.short("api-paginate")
    await publish(sandbox, "production", short)

    # The same env twice at once: one runs, the other is told who holds it, why and since when.
    first = await svc.start(DeployKind.DEPLOY, ["poc"], short, ALICE)
    second = await svc.start(DeployKind.DEPLOY, ["poc"], short, BOB)
    other_env = await svc.start(DeployKind.DEPLOY, ["staging"], short, BOB)
    records = {s.record.id: await svc.wait(s.record.id) for s in (first, second, other_env)}

    poc = [records[first.record.id], records[second.record.id]]
    won = [r for r in poc if r.state is DeployState.SUCCEEDED]
    lost = [r for r in poc if r.state is DeployState.FAILED]
    assert len(won) == 1 and len(lost) == 1, [(r.requester, r.state, r.message) for r in poc]
    winner, loser = won[0], lost[0]
    assert loser.message is not None
    assert loser.message.startswith(
        f"poc is busy: deploy {winner.id} (deploy of {short}, requested by <@{winner.requester}>)"
    )
    assert re.search(r"has held it since \d{4}-\d\d-\d\d \d\d:\d\d UTC \(\d+ s ago\)", loser.message), (
        loser.message
    )
    refusal = events.summary(loser.id)
    assert refusal["failed_step"] == "lock"
    assert events.of(loser.id, "deploy", EventKind.FAILED)[-1].message == loser.message
    assert (refusal["hint"] or "").startswith("Wait for it to finish")
    assert events.steps(loser.id, EventKind.STARTED) == []  # refused before anything ran
    # a different env at the same time is not held up
    assert records[other_env.record.id].state is DeployState.SUCCEEDED, records[other_env.record.id].message
    for env in ("poc", "staging"):
        assert overlay_tag(sandbox, env, "api") == short
        assert live_image(sandbox, env, "funnelcake-api").endswith(f":{short}")

    # Roll poc back: the previous tag, in git and on the cluster; staging stays where it is.
    assert await svc.rollback_target("poc") == before
    # back across 000003_add_index, which stays applied: the requester confirms it
    rollback = await svc.start_rollback("poc", ALICE, allow_downgrade=True)
    record = await svc.wait(rollback.record.id)
    assert record.state is DeployState.SUCCEEDED, record.message
    assert record.kind is DeployKind.ROLLBACK
    for service_name in ("api", "relay"):
        assert overlay_tag(sandbox, "poc", service_name) == before
    for name in SERVICES:
        assert live_image(sandbox, "poc", name) == f"{sandbox.registries.prefix('poc')}/{name}:{before}"
        assert live_image(sandbox, "staging", name).endswith(f":{short}")
    history = await svc.history("poc")
    assert [h.kind for h in history[:2]] == [DeployKind.ROLLBACK, DeployKind.DEPLOY]
