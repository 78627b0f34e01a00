"""verify: the live image equals the expected one for every service, pods Ready, the site answers (F3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot.adapters.site import check_site
from bot.errors import PermanentError
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Progress, Step
from bot.settings import Service


class Verify(Step[DeployContext]):
    name = "verify"
    timeout = 120.0

    async def run(self, ctx: DeployContext, progress: Progress) -> Mapping[str, Any]:
        plan = ctx.require_plan()
        short = plan.commit.short
        problems: list[str] = []
        live: dict[str, dict[str, str]] = {}
        for env in ctx.envs:
            client = ctx.deps.kube[env.kube_context]
            live[env.name] = {}
            for service in Service:
                name = service.image
                dep = await client.call(
                    f"deployment {env.namespace}/{name}",
                    client.apps.read_namespaced_deployment,
                    name,
                    env.namespace,
                )
                containers = dep.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
                image = str(containers[0].get("image", "")) if containers else ""
                live[env.name][service.value] = image
                want = env.image_ref(service.image, short)
                if image != want:
                    problems.append(f"{env.name}/{name} runs {image or 'no image'}, expected {want}")
                status = dep.get("status", {})
                ready, total = int(status.get("readyReplicas") or 0), int(status.get("replicas") or 0)
                if ready < int(dep.get("spec", {}).get("replicas") or 0) or ready < total:
                    problems.append(f"{env.name}/{name}: only {ready}/{total} pods ready")
            site = await check_site(
                str(env.site_url) if env.site_url else None,
                short,
                session=ctx.deps.http,
                limit=ctx.deps.config.timeouts.site,
            )
            ctx.sites[env.name] = site
            await progress(f"{env.name}: {site.message}", {"env": env.name, "site": site.status})
            if site.status == "failed":
                problems.append(site.message)
        if problems:
            raise PermanentError(
                "verification failed:\n" + "\n".join(f"• {p}" for p in problems),
                hint="Argo CD synced, but the cluster does not run what was deployed; see the status report.",
            )
        return {"live": live, "sites": {e: (s.status, s.message) for e, s in ctx.sites.items()}}
