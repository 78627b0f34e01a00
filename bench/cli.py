"""Benchmark of the `funnelcake` CLI as a user runs it: wall time of `status` and `history`, each a fresh process.

Runs the whole local sandbox (tests/testbed/sandbox.py: registries, git remotes, three simulated clusters
whose kubeconfig authenticates through the fake gke-gcloud-auth-plugin) and measures, interleaved, as medians:
  (a) `funnelcake status` (the installed console script), a new process each time;
  (b) a bare kubernetes_asyncio script in a new process doing the cluster reads of (a): per env, a client
      from the kubeconfig (the library runs the exec plugin for each), then per service the Deployment, the
      Argo CD Application and the Deployment's pods, all envs and services concurrently;
  (c) `funnelcake history`, a new process;
  (d) a bare SQL query in a new process: the newest 20 rows of the ledger's `deploys` table (sqlite3).
The CLI does more than (b) (the GitOps overlays, the registries, the site and relay checks, the drift
findings); (b) is the floor a hand-written script would pay for the cluster part alone.

The last line is `cli status_x=<a/b> history_s=<c> status_s=<a> bare_kube_s=<b> bare_sql_s=<d> plugin_runs=<n>`,
where plugin_runs counts the credential plugin's runs during one `funnelcake status`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.settings import Service
from tests.testbed.sandbox import Sandbox

REPO_ROOT = Path(__file__).resolve().parent.parent

BARE_KUBE = """
import asyncio, json, sys
from kubernetes_asyncio import client, config

async def env_reads(kubeconfig, ctx, ns, argo_ns, services):
    api = await config.new_client_from_config(config_file=kubeconfig, context=ctx, persist_config=False)
    async with api:
        apps, core, custom = client.AppsV1Api(api), client.CoreV1Api(api), client.CustomObjectsApi(api)

        async def service(deployment, app):
            dep, argo = await asyncio.gather(
                apps.read_namespaced_deployment(deployment, ns, _preload_content=False),
                custom.get_namespaced_custom_object(
                    "argoproj.io", "v1alpha1", argo_ns, "applications", app, _preload_content=False
                ),
            )
            body = json.loads(await dep.read())
            await argo.read()
            match = body["spec"]["selector"]["matchLabels"]
            pods = await core.list_namespaced_pod(
                ns, label_selector=",".join(f"{k}={v}" for k, v in sorted(match.items())), _preload_content=False
            )
            return len(json.loads(await pods.read())["items"])

        return await asyncio.gather(*(service(d, a) for d, a in services))

async def main():
    spec = json.loads(sys.argv[1])
    counts = await asyncio.gather(
        *(env_reads(spec["kubeconfig"], e["context"], e["namespace"], e["argo_ns"], e["services"]) for e in spec["envs"])
    )
    print(json.dumps(counts))

asyncio.run(main())
"""

BARE_SQL = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
rows = db.execute("SELECT * FROM deploys ORDER BY created_at DESC LIMIT 20").fetchall()
print(len(rows))
"""


async def run(env: dict[str, str], *argv: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    took = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # status exits 0; a finding is fine, a crash is not
        raise SystemExit(f"{' '.join(argv[:4])} failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return took, out.decode()


async def main(runs: int) -> None:
    t0 = time.perf_counter()
    async with Sandbox() as sb:
        assert sb.config is not None
        assert sb.clusters is not None
        assert sb.git is not None
        print(f"sandbox up in {time.perf_counter() - t0:.1f}s")
        counter = sb.root / "plugin-runs"
        kubeconfig = sb.clusters.write_kubeconfig(sb.root / "kubeconfig-counted", counter=counter)
        s = sb.settings()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "FUNNELCAKE_CONFIG": str(sb.config_path),
            "KUBECONFIG": str(kubeconfig),
            "DATABASE_URL": s.database_url,
            "WORK_DIR": str(s.work_dir),
        }
        cli = (str(Path(sys.executable).with_name("funnelcake")),)  # the console script a user runs
        spec = {
            "kubeconfig": str(kubeconfig),
            "envs": [
                {
                    "context": e.kube_context,
                    "namespace": e.namespace,
                    "argo_ns": e.argocd.namespace,
                    "services": [
                        (svc.image, e.argocd.applications.get(svc, f"funnelcake-{svc.value}"))
                        for svc in Service
                    ],
                }
                for e in sb.config.environments
            ],
        }
        bare_kube = (sys.executable, "-c", BARE_KUBE, json.dumps(spec))
        db_path = s.database_url.split("///", 1)[1]
        bare_sql = (sys.executable, "-c", BARE_SQL, db_path)

        # warm-up: the ledger gets its schema and a few deploys (one real one, then its rollback), the
        # work dir its clones; none of it is measured
        short = sb.git.app.short("head")
        for image in ("funnelcake-api", "funnelcake-relay", "funnelcake-migrate"):
            await sb.registries.push("production", image, short, "multi", seed=f"{image}:{short}")
        me = {**env, "FUNNELCAKE_CONFIG": str(with_operator(sb))}
        await run(me, *cli, "deploy", "poc", short, "--yes")
        await run(me, *cli, "rollback", "poc", "--allow-downgrade")
        await run(env, *cli, "status")
        _, rows = await run(env, *bare_sql)
        _, counts = await run(env, *bare_kube)
        print(f"ledger rows read by the bare query: {rows.strip()}; pods per env/service: {counts.strip()}")

        counter.unlink(missing_ok=True)
        await run(env, *cli, "status")
        plugin_runs = counter.read_text().count("\n") if counter.exists() else 0

        status: list[float] = []
        kube: list[float] = []
        history: list[float] = []
        sql: list[float] = []
        for _ in range(runs):  # interleaved, so load from elsewhere falls on every variant alike
            status.append((await run(env, *cli, "status"))[0])
            kube.append((await run(env, *bare_kube))[0])
            history.append((await run(env, *cli, "history"))[0])
            sql.append((await run(env, *bare_sql))[0])

    med = {
        k: statistics.median(v)
        for k, v in (("status", status), ("kube", kube), ("history", history), ("sql", sql))
    }
    print(f"funnelcake status   {med['status']:.3f} s  (runs: {', '.join(f'{x:.2f}' for x in status)})")
    print(f"bare kube script    {med['kube']:.3f} s  (runs: {', '.join(f'{x:.2f}' for x in kube)})")
    print(f"funnelcake history  {med['history']:.3f} s  (runs: {', '.join(f'{x:.2f}' for x in history)})")
    print(f"bare SQL query      {med['sql']:.3f} s  (runs: {', '.join(f'{x:.2f}' for x in sql)})")
    print(f"credential plugin runs in one `funnelcake status` over three clusters: {plugin_runs}")
    print(
        f"cli status_x={med['status'] / med['kube']:.2f} history_s={med['history']:.3f} "
        f"status_s={med['status']:.3f} bare_kube_s={med['kube']:.3f} bare_sql_s={med['sql']:.3f} "
        f"plugin_runs={plugin_runs}"
    )


def with_operator(sb: Sandbox) -> Path:
    """The environments file with the OS user running the benchmark as a poc deployer (for the warm-up deploy)."""
    import pwd  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    data = yaml.safe_load(sb.config_path.read_text())
    data["operators"] = [{"os_user": pwd.getpwuid(os.getuid()).pw_name, "slack_user": "U0ALICE"}]
    path = sb.root / "bench-cli.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.runs))
