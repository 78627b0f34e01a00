"""Benchmark: seconds from the simulated kubelet setting ErrImagePull on a new pod to the bot's diagnosis.

Standalone (`.venv/bin/python bench/detect.py`): real local registries and git remotes, one simulated
cluster (staging), the bot's rollout watch with fail-fast. Each of 5 runs points the Deployment at a tag that
is missing from the registry; the clock starts at the Store write that first shows ErrImagePull on a pod of
the new template and stops when watch_rollout raises its diagnosis. Last line: `detect seconds=<median>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.adapters.diagnosis import Cause, Diagnoser
from bot.adapters.kube import KubeClients
from bot.adapters.registry import RegistryClient
from bot.adapters.rollout import RolloutFailed, watch_rollout
from tests.testbed.gitrepos import DEFAULT_DEPLOYED, GitRemotes, funnelcake_config
from tests.testbed.kube.cluster import MIGRATION_MODES, SimCluster, Timings, push_deployed_images
from tests.testbed.kube.kubeconfig import write_kubeconfig
from tests.testbed.registry import Registries

RUNS = 5
NS = "funnelcake"
DEPLOY = "funnelcake-api"
# The pull takes a little while, as on a node: the bot's watch is in place before the failure appears.
TIMINGS = Timings(pull_delay=0.3)


def _err_image_pull(pod: dict[str, Any], image: str) -> bool:
    containers = (pod.get("spec") or {}).get("containers") or []
    if not containers or containers[0].get("image") != image:
        return False
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if ((cs.get("state") or {}).get("waiting") or {}).get("reason") == "ErrImagePull":
            return True
    return False


async def _first_err_image_pull(queue: asyncio.Queue[tuple[str, str, dict[str, Any]]], image: str) -> float:
    loop = asyncio.get_running_loop()
    while True:
        _, resource, obj = await queue.get()
        if resource == "pods" and _err_image_pull(obj, image):
            return loop.time()


async def one_run(cluster: SimCluster, clients: KubeClients, diagnoser: Diagnoser, image: str) -> float:
    queue = cluster.store.subscribe()
    try:
        seen = asyncio.create_task(_first_err_image_pull(queue, image), name="bench-detect-errimagepull")

        def edit(dep: dict[str, Any]) -> None:
            dep["spec"]["template"]["spec"]["containers"][0]["image"] = image

        cluster.store.update("deployments", NS, DEPLOY, edit)
        try:
            await watch_rollout(clients[cluster.context], NS, DEPLOY, diagnoser=diagnoser, give_up_after=60)
        except RolloutFailed as e:
            detected = asyncio.get_running_loop().time()
            if e.diagnosis is None or e.diagnosis.kind is not Cause.TAG_MISSING:
                raise RuntimeError(f"unexpected diagnosis: {e.diagnosis}") from e
        else:
            raise RuntimeError("the rollout to a missing tag succeeded")
        started = await asyncio.wait_for(seen, 5)
        return detected - started
    finally:
        cluster.store.unsubscribe(queue)


async def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-detect-") as tmp:
        root = Path(tmp)
        registries = Registries()
        await registries.start()
        try:
            prefixes = {env: registries.prefix(env) for env in registries.by_env}
            remotes = await GitRemotes(root / "git", registries=prefixes, deployed=DEFAULT_DEPLOYED).start()
            tags = {"staging": remotes.app.short(DEFAULT_DEPLOYED["staging"])}
            await push_deployed_images(registries, tags)
            cfg = funnelcake_config(remotes.gitops, remotes.app)
            env = cfg.env("staging")
            cluster = SimCluster(
                "staging",
                registry_url=registries["staging"].url,
                registry_prefix=registries.prefix("staging"),
                gitops_url=remotes.gitops.url,
                app_url=remotes.app.url,
                migrations_mode=MIGRATION_MODES["staging"],
                timings=TIMINGS,
                work_dir=root / "simkube",
            )
            async with cluster, RegistryClient(attempts=1) as rc:
                path = write_kubeconfig(root / "kubeconfig", {cluster.context: cluster.url})
                async with await KubeClients.from_kubeconfig(path, [cluster.context]) as clients:
                    diagnoser = Diagnoser(env, cfg.environments, check=rc.check)
                    times = []
                    for i in range(RUNS):
                        image = env.image_ref("funnelcake-api", f"{0xDEAD000 + i:07x}")
                        seconds = await one_run(cluster, clients, diagnoser, image)
                        times.append(seconds)
                        print(f"run {i + 1}: {seconds:.3f} s from ErrImagePull to diagnosis ({image})")
            with contextlib.suppress(Exception):
                await remotes.stop()
        finally:
            await registries.stop()
    print(f"detect seconds={statistics.median(times):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
