"""verify: the live image equals the expected one for every service, pods Ready, the site answers (F3),
the relay speaks Nostr at the new version (NIP-11, REQ→EOSE) and the API's /health answers."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bot.adapters.endpoints import check_endpoints, summary_line
from bot.adapters.site import check_site
from bot.errors import PermanentError
from bot.pipeline.context import DeployContext
from bot.pipeline.engine import Step, StepProgress
from bot.pipeline.events import Verified
from bot.pipeline.vocab import StepName
from bot.settings import DEFAULT_STEP_BUDGETS, Service


class Verify(Step[DeployContext]):
    name = StepName.VERIFY
    timeout = DEFAULT_STEP_BUDGETS.verify

    async def run(self, ctx: DeployContext, progress: StepProgress) -> Mapping[str, Any]:
        plan = ctx.require_plan()
        short = plan.commit.short
        problems: list[str] = []
        endpoint_problems: list[str] = []
        live: dict[str, dict[str, str]] = {}
        for env in ctx.envs:
            client = ctx.deps.kube[env.kube_context]
            live[env.name] = {}
            for service in Service:
                name = service.image
                dep = await client.read_deployment(env.namespace, name)
                containers = dep.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
                image = str(containers[0].get("image", "")) if containers else ""
                live[env.name][service.value] = image
                want = env.image_ref(service.image, short)
                checked = ctx.verified.get((env.name, service.image))
                if ctx.deps.gitops.pin_digests and checked is not None and checked.digest:
                    want += f"@{checked.digest}"  # the overlay pins the digest the images step checked
                elif image.startswith(f"{want}@"):
                    image = want  # pinned by an earlier bot of this deploy: the tag is what is verified here
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
            checks = await check_endpoints(
                env.endpoints,
                short,
                session=ctx.deps.http,
                relay_limit=ctx.deps.config.timeouts.relay,
                api_limit=ctx.deps.config.timeouts.api,
            )
            ctx.endpoints[env.name] = checks
            for check in checks:
                await progress(f"{env.name}: {check.message}", {"env": env.name, check.check: check.status})
                if check.status == "failed":
                    endpoint_problems.append(f"{env.name}: {check.message}")
        if problems or endpoint_problems:
            hint = (
                "Argo CD synced, but the cluster does not run what was deployed; see the status report."
                if problems
                else "The pods are up, but the service does not answer as it should: check the relay's and "
                "the API's logs, then roll back if it does not recover."
            )
            raise PermanentError(
                "verification failed:\n" + "\n".join(f"• {p}" for p in problems + endpoint_problems),
                hint=hint,
                data=self._json(ctx),
            )
        return {
            "live": live,
            "sites": {e: (s.status, s.message) for e, s in ctx.sites.items()},
            **self._json(ctx),
        }

    @staticmethod
    def _json(ctx: DeployContext) -> dict[str, Any]:
        """The relay and API checks per env, and the one line per env a thread shows."""
        return {
            "endpoints": {env: [c.to_json() for c in checks] for env, checks in ctx.endpoints.items()},
            **Verified({env: summary_line(checks) for env, checks in ctx.endpoints.items()}).to_json(),
        }
