"""The built image boots and behaves as an operator expects: run with podman, read-only, as the Deployment runs it.

`make image-test` builds the image (`make image`) and runs this module with FUNNELCAKE_IMAGE set; the
`image` marker keeps it out of `make test`. Needs root podman (the build's containers-storage).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.image

ROOT = Path(__file__).resolve().parent.parent
UID = 10001
BOT_TOKEN = "xoxb-image-test-" + uuid.uuid4().hex  # not a real token: it must still never be logged
SIGNING_SECRET = "image-test-signing-" + uuid.uuid4().hex
GRACE = 30  # the Deployment's terminationGracePeriodSeconds, and `podman stop -t`
# What the machine needs (make image-test sets them): global flags (the OCI runtime), and `podman run` flags.
PODMAN_ARGS = shlex.split(os.environ.get("FUNNELCAKE_PODMAN_ARGS", ""))
PODMAN_RUN_ARGS = shlex.split(os.environ.get("FUNNELCAKE_PODMAN_RUN_ARGS", ""))


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["podman", *PODMAN_ARGS, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


@dataclass
class Bot:
    name: str
    volume: str
    port: int

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *argv, timeout=60, check=check)

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - a local http:// URL
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def image() -> str:
    ref = os.environ.get("FUNNELCAKE_IMAGE")
    if not ref:
        pytest.fail("FUNNELCAKE_IMAGE is not set: run `make image-test`, which builds the image and sets it")
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (`make image` installs it)")
    podman("image", "exists", ref)
    return ref


def kubeconfig(path: Path) -> Path:
    """The contexts config/funnelcake.yaml names, each on an API address nothing answers, no credentials.

    The bot reads the kubeconfig at start (a missing context is a configuration error) but connects only
    when a command or the watcher needs a cluster.
    """
    config = yaml.safe_load((ROOT / "config" / "funnelcake.yaml").read_text(encoding="utf-8"))
    names = sorted({env["kube_context"] for env in config["environments"]})
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": n, "cluster": {"server": "https://127.0.0.1:9"}} for n in names],
                "users": [{"name": "nobody", "user": {}}],
                "contexts": [{"name": n, "context": {"cluster": n, "user": "nobody"}} for n in names],
            }
        ),
        encoding="utf-8",
    )
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module")
def bot(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bot]:
    kube = kubeconfig(tmp_path_factory.mktemp("kube") / "config")
    tag = uuid.uuid4().hex[:8]
    b = Bot(name=f"funnelcake-image-test-{tag}", volume=f"funnelcake-image-test-{tag}", port=free_port())
    podman("volume", "create", b.volume)
    try:
        # As deploy/base runs it: read-only root, /tmp and the ledger's volume writable, no capabilities.
        # The image's own defaults otherwise (SQLite ledger on the volume, config, port 3000); Slack in HTTP
        # mode with made-up credentials and an API URL nothing answers, so nothing leaves this machine.
        podman(
            "run", "--detach", "--name", b.name,
            "--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp",
            "--volume", f"{b.volume}:/var/lib/funnelcake",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "--publish", f"127.0.0.1:{b.port}:3000",
            "--volume", f"{kube}:/etc/funnelcake/kube/config:ro",
            "--env", "KUBECONFIG=/etc/funnelcake/kube/config",
            "--env", "SLACK_MODE=http",
            "--env", f"SLACK_BOT_TOKEN={BOT_TOKEN}",
            "--env", f"SLACK_SIGNING_SECRET={SIGNING_SECRET}",
            "--env", "SLACK_API_URL=http://127.0.0.1:9/api/",
            *PODMAN_RUN_ARGS,
            image,
        )  # fmt: skip
        deadline = time.monotonic() + 90
        while True:
            state = json.loads(podman("inspect", b.name).stdout)[0]["State"]
            if not state["Running"]:
                pytest.fail(f"the bot exited ({state['ExitCode']}) before /healthz answered:\n{b.logs()}")
            try:
                if get(b.url("/healthz"))[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"/healthz did not answer 200 within 90 s:\n{b.logs()}")
            time.sleep(0.5)
        yield b
    finally:
        podman("rm", "--force", "--time", "0", b.name, check=False)
        podman("volume", "rm", "--force", b.volume, check=False)


def test_healthz_and_metrics(bot: Bot) -> None:
    assert get(bot.url("/healthz"))[0] == 200
    status, body = get(bot.url("/readyz"))
    assert status == 200, f"readyz: {status} {body}"  # the SQLite ledger on the volume answers
    status, metrics = get(bot.url("/metrics"))
    assert status == 200
    series = {
        line.split("{")[0].split()[0] for line in metrics.splitlines() if line.startswith("funnelcake_bot_")
    }
    assert series, metrics[:2000]
    # the image's own HEALTHCHECK (kept by `buildah bud --format docker`) passes too
    check = podman("healthcheck", "run", bot.name, check=False)
    assert check.returncode == 0, check.stdout + check.stderr


def test_runs_as_uid_10001_under_tini(bot: Bot) -> None:
    listing = bot.exec(
        "python",
        "-c",
        "import json, pathlib\n"
        "out = []\n"
        "for p in pathlib.Path('/proc').glob('[0-9]*'):\n"
        "    try:\n"
        "        status = (p / 'status').read_text().splitlines()\n"
        "        uid = next(l.split()[1] for l in status if l.startswith('Uid:'))\n"
        "        argv = (p / 'cmdline').read_bytes().decode().split('\\0')[:-1]\n"
        "    except OSError:\n"
        "        continue\n"
        "    out.append([int(p.name), int(uid), argv])\n"
        "print(json.dumps(sorted(out)))\n",
    ).stdout
    procs = [(pid, uid, " ".join(argv)) for pid, uid, argv in json.loads(listing)]
    assert procs[0][0] == 1 and procs[0][2].startswith("/usr/bin/tini"), listing
    bots = [p for p in procs if p[2] == "python -m bot"]
    assert len(bots) == 1, listing
    # tini, the bot and this probe (podman exec runs as the image's USER too)
    assert {uid for _, uid, _ in procs} == {UID}, listing


def test_cli_version_and_pip_check(bot: Bot) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
    assert bot.exec("funnelcake", "--version").stdout.strip() == f"funnelcake {version}"
    checked = bot.exec("pip", "check", check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # exactly the lock's pins are installed (and the bot's own metadata): nothing came from elsewhere
    lock = {
        m.group(1).lower().replace("_", "-"): m.group(2)
        for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
    }
    frozen = bot.exec("pip", "list", "--format", "json").stdout
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in json.loads(frozen)}
    installed.pop("pip", None)  # the venv's own, from ensurepip
    installed.pop("setuptools", None)
    assert installed.pop("funnelcake-deploy-bot") == version
    assert installed == lock


def test_kube_tools(bot: Bot) -> None:
    kubectl = bot.exec("kubectl", "version", "--client", check=False)
    assert kubectl.returncode == 0 and "Client Version:" in kubectl.stdout, kubectl.stdout + kubectl.stderr
    has_plugin = bot.exec("sh", "-c", "command -v gke-gcloud-auth-plugin", check=False).returncode == 0
    # make image (KUBE_TOOLS=context) copies the host's tools into this dir; a release image has both
    given = os.environ.get("FUNNELCAKE_KUBE_TOOLS_DIR")
    if given and not (Path(given) / "gke-gcloud-auth-plugin").exists():
        assert not has_plugin
        pytest.skip(f"the build had no gke-gcloud-auth-plugin ({given} has none): this image cannot use GKE")
    assert has_plugin, "the image has no gke-gcloud-auth-plugin"
    plugin = bot.exec("gke-gcloud-auth-plugin", "--version", check=False)
    assert plugin.returncode == 0, plugin.stdout + plugin.stderr


def test_root_filesystem_is_read_only_and_the_ledger_is_on_the_volume(bot: Bot) -> None:
    assert json.loads(podman("inspect", bot.name).stdout)[0]["HostConfig"]["ReadonlyRootfs"] is True
    write = bot.exec("sh", "-c", "touch /app/x", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    ledger = bot.exec("stat", "-c", "%u %s", "/var/lib/funnelcake/funnelcake-bot.db").stdout.split()
    assert int(ledger[0]) == UID and int(ledger[1]) > 0
    assert bot.exec("sh", "-c", "touch /tmp/x && echo ok").stdout.strip() == "ok"


def test_no_secret_in_the_logs(bot: Bot) -> None:
    logs = bot.logs()
    assert "funnelcake-bot ready (http mode" in logs, logs
    assert BOT_TOKEN not in logs and SIGNING_SECRET not in logs
    # the build's pip-ca secret (make image passes the host's CA bundle) stayed out of every layer
    left = bot.exec("sh", "-c", "ls -d /run/secrets /run/build-ca.crt 2>/dev/null", check=False).stdout
    assert not left.strip(), left


def test_sigterm_stops_it_within_the_grace_period(bot: Bot) -> None:
    """Last in the module: it stops the bot the other tests share."""
    started = time.monotonic()
    podman("stop", "--time", str(GRACE), bot.name, timeout=GRACE + 30)
    took = time.monotonic() - started
    state = json.loads(podman("inspect", bot.name).stdout)[0]["State"]
    logs = bot.logs()
    assert took < GRACE, f"podman stop took {took:.1f} s: the bot ignored SIGTERM and was killed\n{logs}"
    # main() returns 0 once the stop event has run the hand-over; tini passes the child's status on
    assert state["ExitCode"] == 0, f"exit {state['ExitCode']}\n{logs}"
    assert "stopping: no new requests" in logs, logs
