"""The ship-it files: kustomize renders each overlay as the brief says, the Dockerfile, lock and Slack manifest hold."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bot.settings import parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
OVERLAYS = ("single", "ha-postgres")
SLACK_SECRETS = ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN", "SLACK_SIGNING_SECRET")


# ---- kustomize ------------------------------------------------------------------------------------------


def render(path: Path) -> list[dict[str, Any]]:
    proc = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@dataclass
class Rendered:
    objects: list[dict[str, Any]]

    def one(self, kind: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        containers = self.pod["containers"]
        assert len(containers) == 1
        return containers[0]

    def env(self, name: str) -> dict[str, Any]:
        entries = [e for e in self.container.get("env", []) if e["name"] == name]
        assert len(entries) == 1, f"env {name} appears {len(entries)} times"
        return entries[0]

    def volume(self, name: str) -> dict[str, Any]:
        return next(v for v in self.pod["volumes"] if v["name"] == name)

    def mount_for(self, path: str) -> tuple[dict[str, Any], str]:
        """The volume mount whose mountPath holds `path`, and the rest of the path inside the volume."""
        best: tuple[dict[str, Any], str] | None = None
        for m in self.container["volumeMounts"]:
            mp = m["mountPath"].rstrip("/")
            if path == mp or path.startswith(mp + "/"):
                rest = path[len(mp) :].lstrip("/")
                if best is None or len(mp) > len(best[0]["mountPath"]):
                    best = (m, rest)
        assert best is not None, f"{path} is not on any mounted volume"
        return best


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, Rendered]:
    return request.param, Rendered(render(DEPLOY / "overlays" / request.param))


def test_base_renders_without_secret_values() -> None:
    objects = render(DEPLOY / "base")
    kinds = sorted(o["kind"] for o in objects)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PodMonitoring",
            "Service",
            "ServiceAccount",
        ]
    )


def test_no_secret_value_is_rendered(overlay: tuple[str, Rendered]) -> None:
    _, r = overlay
    assert not [o for o in r.objects if o["kind"] == "Secret"], "secrets are referenced, never shipped"
    for e in r.container["env"]:
        if re.search(r"TOKEN|SECRET|PASSWORD", e["name"]):
            assert "value" not in e, f"{e['name']} must come from a Secret"
            assert e["valueFrom"]["secretKeyRef"]["name"]


def test_slack_secrets_come_from_the_slack_secret(overlay: tuple[str, Rendered]) -> None:
    _, r = overlay
    refs = {n: r.env(n)["valueFrom"]["secretKeyRef"] for n in SLACK_SECRETS}
    assert {ref["name"] for ref in refs.values()} == {"funnelcake-bot-slack"}
    assert refs["SLACK_BOT_TOKEN"].get("optional", False) is False
    assert r.env("SLACK_MODE")["value"] in ("socket", "http")


def test_one_replica_deployment_shape_is_secure(overlay: tuple[str, Rendered]) -> None:
    _, r = overlay
    pod, c = r.pod, r.container
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # the writable places are emptyDirs, not the image
    for path in (r.env("WORK_DIR")["value"], r.env("HOME")["value"], "/tmp"):
        mount, _ = r.mount_for(path)
        assert "emptyDir" in r.volume(mount["name"]), f"{path} must be on an emptyDir"
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]
    image = c["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image


def test_probes_hit_the_bot_listener(overlay: tuple[str, Rendered]) -> None:
    _, r = overlay
    c = r.container
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["http"] == int(r.env("HTTP_PORT")["value"]) == 3000
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_config_map_is_the_environments_file(overlay: tuple[str, Rendered]) -> None:
    _, r = overlay
    cm = r.one("ConfigMap")
    mount, key = r.mount_for(r.env("FUNNELCAKE_CONFIG")["value"])
    assert r.volume(mount["name"])["configMap"]["name"] == cm["metadata"]["name"]
    assert re.fullmatch(r"funnelcake-bot-config-[a-z0-9]{10}", cm["metadata"]["name"]), (
        "hashed name rolls pods"
    )
    text = cm["data"][key]
    assert text == (ROOT / "config" / "funnelcake.yaml").read_text(encoding="utf-8")
    assert parse_config(text).env_names == ["production", "staging", "poc"]


def test_deploy_copy_of_the_environments_file_is_current() -> None:
    copy = (DEPLOY / "base" / "funnelcake.yaml").read_text(encoding="utf-8")
    source = (ROOT / "config" / "funnelcake.yaml").read_text(encoding="utf-8")
    assert copy == source, "deploy/base/funnelcake.yaml is stale: cp config/funnelcake.yaml deploy/base/"


def test_files_from_secrets_are_mounted(overlay: tuple[str, Rendered]) -> None:
    _, r = overlay
    mount, key = r.mount_for(r.env("KUBECONFIG")["value"])
    assert r.volume(mount["name"])["secret"]["secretName"] == "funnelcake-bot-kubeconfig"
    assert key == "config"
    mount, key = r.mount_for(r.env("GIT_SSH_KEY_PATH")["value"])
    secret = r.volume(mount["name"])["secret"]
    assert secret["secretName"] == "funnelcake-bot-git" and key == "ssh-privatekey"
    # readable by the bot's group only; ssh refuses world-readable keys
    assert secret["defaultMode"] & 0o007 == 0
    known, _ = r.mount_for("/etc/ssh/ssh_known_hosts")
    assert known["name"] == mount["name"] and known["subPath"] == "known_hosts"
    assert all(m.get("readOnly") for m in r.container["volumeMounts"] if m["name"] in ("git", "kubeconfig"))
    assert r.pod["automountServiceAccountToken"] is False


def test_service_account_pdb_and_service_select_the_pods(overlay: tuple[str, Rendered]) -> None:
    _, r = overlay
    labels = r.deployment["spec"]["template"]["metadata"]["labels"]
    assert r.deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert r.pod["serviceAccountName"] == r.one("ServiceAccount")["metadata"]["name"]
    pdb = r.one("PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1
    assert "minAvailable" not in pdb["spec"]
    svc = r.one("Service")
    assert svc["spec"]["selector"] and svc["spec"]["selector"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] == "http"
    assert svc["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    namespaces = {o["metadata"].get("namespace") for o in r.objects}
    assert namespaces == {"funnelcake-bot"}


def _ports(rules: list[dict[str, Any]]) -> set[tuple[str, int | str]]:
    return {(p.get("protocol", "TCP"), p["port"]) for rule in rules for p in rule.get("ports", [])}


def test_network_policy_lets_in_only_the_listener_and_out_only_what_the_bot_calls(
    overlay: tuple[str, Rendered],
) -> None:
    name, r = overlay
    policies = [o for o in r.objects if o["kind"] == "NetworkPolicy"]
    labels = r.deployment["spec"]["template"]["metadata"]["labels"]
    for p in policies:
        assert p["apiVersion"] == "networking.k8s.io/v1"
        assert p["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (main,) = [p for p in policies if "Ingress" in p["spec"]["policyTypes"]]
    assert main["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # ingress: the probe/metrics port only, the container's port named http
    assert _ports(main["spec"]["ingress"]) == {("TCP", "http")}
    ports = {p["name"]: p["containerPort"] for p in r.container["ports"]}
    assert ports == {"http": 3000}
    egress = [rule for p in policies for rule in p["spec"]["egress"]]
    allowed = _ports(egress)
    # DNS, HTTPS (Kubernetes API / Connect Gateway, registries, Slack), git over ssh, the metadata server
    assert {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 22), ("TCP", 80), ("TCP", 988)} <= allowed
    metadata = [rule for rule in egress if _ports([rule]) == {("TCP", 80)}]
    assert [rule["to"] for rule in metadata] == [[{"ipBlock": {"cidr": "169.254.169.254/32"}}]]
    expected = {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 22), ("TCP", 80), ("TCP", 988)}
    if name == "ha-postgres":
        expected.add(("TCP", 5432))  # the shared ledger
    assert allowed == expected, "nothing else goes out"


def test_managed_prometheus_scrapes_the_metrics_route(overlay: tuple[str, Rendered]) -> None:
    _, r = overlay
    monitor = r.one("PodMonitoring")
    assert monitor["apiVersion"] == "monitoring.googleapis.com/v1"
    labels = r.deployment["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["interval"]
    assert monitor["metadata"]["namespace"] == "funnelcake-bot"


def test_single_keeps_sqlite_on_a_volume() -> None:
    r = Rendered(render(DEPLOY / "overlays" / "single"))
    spec = r.deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}, "two pods must never write one SQLite file"
    url = r.env("DATABASE_URL")["value"]
    assert url.startswith("sqlite+aiosqlite:////")
    mount, _ = r.mount_for(url.removeprefix("sqlite+aiosqlite:///"))
    claim = r.volume(mount["name"])["persistentVolumeClaim"]["claimName"]
    pvc = r.one("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_ha_postgres_runs_two_replicas_on_a_secret_database_url() -> None:
    r = Rendered(render(DEPLOY / "overlays" / "ha-postgres"))
    spec = r.deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    ref = r.env("DATABASE_URL")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "funnelcake-bot-database", "key": "database-url"}
    assert not [o for o in r.objects if o["kind"] == "PersistentVolumeClaim"]
    spread = r.pod["topologySpreadConstraints"][0]
    labels = r.deployment["spec"]["template"]["metadata"]["labels"]
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()


# ---- Dockerfile ------------------------------------------------------------------------------------------


@dataclass
class Instruction:
    op: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, op: str) -> list[str]:
        return [i.args for i in self.instructions if i.op == op]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions with continuations joined and comments dropped; ARG defaults before FROM are global."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") and not current:
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            lines.append(current.strip())
        current = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, args = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name, []))
        elif not stages:
            assert op == "ARG", f"{op} before the first FROM"
            key, _, value = args.partition("=")
            global_args[key] = value
        else:
            stages[-1].instructions.append(Instruction(op, args.strip()))
    return global_args, stages


def expand(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))


def test_dockerfile_is_multi_stage_on_slim_bookworm(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, stages = dockerfile
    assert len(stages) >= 2
    names = {s.name for s in stages}
    for i, stage in enumerate(stages):
        earlier = {s.name for s in stages[:i]}
        if stage.base == "kube-tools-${KUBE_TOOLS}":  # the runtime picks its kube tools by build arg
            assert {"kube-tools-apt", "kube-tools-context"} <= earlier
            continue
        assert stage.base == "${PYTHON_IMAGE}" or stage.base in earlier, (
            f"{stage.name}: every stage on the one base a release pins, or on a stage built from it"
        )
    assert global_args["KUBE_TOOLS"] == "apt", "the release takes the kube tools from Google's repository"
    # the tag, or the tag pinned by a real digest (never a made-up one shorter than sha256)
    base = expand(stages[0].base, global_args)
    assert re.fullmatch(r"python:3\.11-slim-bookworm(@sha256:[0-9a-f]{64})?", base), base
    runtime = stages[-1]
    assert expand(runtime.base, global_args) == "kube-tools-apt"
    copied_from = {
        a.split()[0].removeprefix("--from=") for s in stages for a in s.all("COPY") if a.startswith("--from=")
    }
    # the one --from that is not a stage is the kube-tools build context, read only by that stage
    assert copied_from - names == {"kube-tools"}
    context_stage = next(s for s in stages if s.name == "kube-tools-context")
    assert any(a.startswith("--from=kube-tools ") for a in context_stage.all("COPY"))
    assert "deps" in {
        a.split()[0].removeprefix("--from=") for a in runtime.all("COPY") if a.startswith("--from=")
    }, "the runtime takes the virtualenv built from the lock"


def test_dockerfile_installs_python_packages_only_from_the_hashed_lock(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = dockerfile
    pip_runs = [r for s in stages for r in s.all("RUN") if "pip install" in r]
    assert len(pip_runs) == 1, "one install, from the lock; nothing installed unpinned"
    (run,) = pip_runs
    words = shlex.split(run)
    assert "--require-hashes" in words and "--no-deps" in words
    assert words[words.index("-r") + 1].endswith("requirements.lock")
    deps = next(s for s in stages if s.name == "deps")
    assert any("requirements.lock" in c for c in deps.all("COPY"))


def _apt_packages(run: str, args: dict[str, str]) -> dict[str, str]:
    install = next(part for part in expand(run, args).split("&&") if "apt-get install" in part)
    words = shlex.split(install)
    return {w.split("=")[0]: w for w in words[words.index("install") + 1 :] if not w.startswith("-")}


def test_dockerfile_runtime_tools_are_pinned(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    runtime = stages[-1]
    run = next(r for r in runtime.all("RUN") if "apt-get install" in r)
    packages = _apt_packages(run, {})
    assert "git" in packages and "openssh-client" in packages and "tini" in packages
    assert "kubectl version --client" in run
    # the release's kube tools: Google's packages, pinned to one gcloud release
    kube = next(s for s in stages if s.name == "kube-tools-apt")
    args = dict(a.partition("=")[::2] for a in kube.all("ARG"))
    run = next(r for r in kube.all("RUN") if "apt-get install" in r)
    packages = _apt_packages(run, args)
    assert re.fullmatch(r"kubectl=1:\d+\.\d+\.\d+-0", packages["kubectl"]), packages["kubectl"]
    plugin = packages["google-cloud-cli-gke-gcloud-auth-plugin"]
    assert re.fullmatch(r"google-cloud-cli-gke-gcloud-auth-plugin=\d+\.\d+\.\d+-0", plugin), plugin
    assert "kubectl version --client" in run and "gke-gcloud-auth-plugin --version" in run
    # the local build's: whatever the kube-tools context holds, checked the same way
    (run,) = next(s for s in stages if s.name == "kube-tools-context").all("RUN")
    assert "kubectl version --client" in run and "gke-gcloud-auth-plugin --version" in run


def test_dockerfile_says_how_to_pin_the_base_by_digest() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "--build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest>" in text
    assert "skopeo inspect --override-os linux --override-arch amd64 --format '{{.Digest}}'" in text
    assert "docker://docker.io/library/python:3.11-slim-bookworm" in text


def _key_check(dockerfile: tuple[dict[str, str], list[Stage]]) -> str:
    _, stages = dockerfile
    stage = next(s for s in stages if s.name == "apt-key")
    assert "GOOGLE_APT_KEY_FINGERPRINTS=" in stage.all("ARG")
    (check,) = [r for r in stage.all("RUN") if "gpg --batch --show-keys" in r]
    (fetch,) = [r for r in stage.all("RUN") if "curl" in r]
    assert "https://packages.cloud.google.com/apt/doc/apt-key.gpg" in fetch and "-o /tmp/apt-key.gpg" in fetch
    kube = next(s for s in stages if s.name == "kube-tools-apt")
    assert "--from=apt-key /cloud.google.gpg /usr/share/keyrings/cloud.google.gpg" in kube.all("COPY")
    return check


def _gpg_key(home: Path, name: str) -> tuple[str, bytes]:
    """A fresh signing key in `home`: its fingerprint and its armored public key."""
    env = {"GNUPGHOME": str(home), "PATH": "/usr/bin:/bin"}
    subprocess.run(
        ["gpg", "--batch", "--passphrase", "", "--quick-gen-key", f"{name} <{name}@example.com>", "ed25519"],
        env=env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    listing = subprocess.run(
        ["gpg", "--batch", "--with-colons", "--list-keys", f"{name}@example.com"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    armored = subprocess.run(
        ["gpg", "--batch", "--armor", "--export", f"{name}@example.com"],
        env=env,
        check=True,
        capture_output=True,
        timeout=30,
    ).stdout
    return fpr, armored


def test_dockerfile_refuses_an_apt_keyring_whose_fingerprints_differ(
    dockerfile: tuple[dict[str, str], list[Stage]], tmp_path: Path
) -> None:
    check = _key_check(dockerfile)
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700)
    google, google_key = _gpg_key(home, "google")
    intruder, intruder_key = _gpg_key(home, "intruder")
    keyring, out = tmp_path / "apt-key.gpg", tmp_path / "cloud.google.gpg"
    script = check.replace("/tmp/apt-key.gpg", str(keyring)).replace("/cloud.google.gpg", str(out))

    def build(fingerprints: str, served: bytes) -> subprocess.CompletedProcess[str]:
        keyring.write_bytes(served)
        out.unlink(missing_ok=True)
        env = {"PATH": "/usr/bin:/bin", "GNUPGHOME": str(home), "GOOGLE_APT_KEY_FINGERPRINTS": fingerprints}
        return subprocess.run(
            ["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    ok = build(f"{google.lower()}", google_key)  # case does not matter
    assert ok.returncode == 0, ok.stderr
    assert out.exists() and not out.read_bytes().startswith(b"-----BEGIN"), "apt wants the binary keyring"
    for fingerprints, served, says in (
        (intruder, google_key, "refusing it"),  # the key was swapped
        (google, google_key + intruder_key, "refusing it"),  # a key was added
        ("", google_key, "GOOGLE_APT_KEY_FINGERPRINTS is empty"),
    ):
        refused = build(fingerprints, served)
        assert refused.returncode != 0
        assert says in refused.stderr, refused.stderr
        assert not out.exists(), "no keyring is written for apt to trust"
    assert google in build(intruder, google_key).stderr, "the refusal shows what the file holds"


def test_dockerfile_runs_as_a_numeric_non_root_user(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    runtime = stages[-1]
    args = dict(a.partition("=")[::2] for a in runtime.all("ARG"))
    users = runtime.all("USER")
    assert users, "the runtime stage must switch user"
    uid, _, gid = expand(users[-1], args).partition(":")
    assert uid.isdigit() and int(uid) != 0, "runAsNonRoot can only verify a numeric UID"
    assert gid.isdigit() and int(gid) != 0
    # the deployment runs as the same user the image was prepared for
    pod = Rendered(render(DEPLOY / "base")).pod
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert pod["securityContext"]["runAsGroup"] == int(gid)


def test_dockerfile_healthcheck_and_entrypoint(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = dockerfile
    runtime = stages[-1]
    (health,) = runtime.all("HEALTHCHECK")
    assert "http://127.0.0.1:3000/healthz" in health
    assert "timeout=" in health.split("CMD", 1)[1], "the probe itself has a timeout"
    (cmd,) = runtime.all("CMD")
    assert yaml.safe_load(cmd) == ["python", "-m", "bot"]
    assert "3000" in runtime.all("EXPOSE")


def test_dockerignore_keeps_the_context_small() -> None:
    rules = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert rules[0] == "*"
    allowed = {r.removeprefix("!").rstrip("/") for r in rules if r.startswith("!")}
    assert allowed == {"requirements.lock", "pyproject.toml", "bot", "handlers", "config"}


# ---- the lock --------------------------------------------------------------------------------------------


def lock_pins() -> dict[str, tuple[str, list[str]]]:
    pins: dict[str, tuple[str, list[str]]] = {}
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8").replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        name, _, version = words[0].partition("==")
        assert version, f"unpinned line in requirements.lock: {line}"
        hashes = [w.removeprefix("--hash=") for w in words[1:] if w.startswith("--hash=sha256:")]
        pins[canonicalize_name(name)] = (version, hashes)
    return pins


def test_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    pins = lock_pins()
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in requirements.lock: regenerate it"
        assert req.specifier.contains(pins[name][0]), (
            f"requirements.lock pins {req.name}=={pins[name][0]}, outside {req.specifier}: regenerate it"
        )
    for name, (_, hashes) in pins.items():
        assert hashes, f"{name} has no --hash in requirements.lock"


def test_lock_matches_what_the_tests_run_on() -> None:
    """The image runs the versions this suite passed with: a drift means regenerating the lock."""
    drift = []
    for name, (version, _) in lock_pins().items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            drift.append(f"{name}=={version} is locked but not installed")
            continue
        if canonicalize_name(installed) != canonicalize_name(version) and installed != version:
            drift.append(f"{name}: locked {version}, tested with {installed}")
    assert not drift, "\n".join(drift)


# ---- Slack app manifest ----------------------------------------------------------------------------------


def test_slack_manifest() -> None:
    manifest = yaml.safe_load((ROOT / "manifest.yml").read_text(encoding="utf-8"))
    (command,) = manifest["features"]["slash_commands"]
    assert command["command"] == "/funnelcake"
    assert command["usage_hint"].startswith("deploy <env> <commit>")
    assert len(command["usage_hint"]) <= 1000
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == {
        "commands",
        "chat:write",
        "users:read",
        "usergroups:read",
        "users:read.email",
    }
    assert manifest["settings"]["interactivity"]["is_enabled"] is True
    assert manifest["features"]["app_home"]["home_tab_enabled"] is True
    assert manifest["settings"]["event_subscriptions"]["bot_events"] == ["app_home_opened"]
    assert manifest["settings"]["socket_mode_enabled"] is True
    text = (ROOT / "manifest.yml").read_text(encoding="utf-8")
    assert "# request_url: https://" in text and "/slack/events" in text


def test_slack_manifest_usage_hint_names_every_command() -> None:
    commands = pytest.importorskip("bot.commands", reason="the command grammar is not in this checkout")
    manifest = yaml.safe_load((ROOT / "manifest.yml").read_text(encoding="utf-8"))
    hint = manifest["features"]["slash_commands"][0]["usage_hint"]
    named = {part.split()[0] for part in hint.split("|")}
    assert named == set(commands.COMMAND_NAMES)
