"""Settings from the process environment and the environments file (YAML), validated up front.

Secrets and switches come from environment variables; the shape of each deploy target (registry,
cluster, Argo CD, overlays, migration mode, who may do what) comes from the file named by
FUNNELCAKE_CONFIG. A bad file yields one ConfigError listing every problem with its field path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AnyHttpUrl,
    AnyWebsocketUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

# re-exported: the steps take their own default budget from here
from bot.budgets import DEFAULT_STEP_BUDGETS as DEFAULT_STEP_BUDGETS  # noqa: PLC0414
from bot.budgets import Timeouts
from bot.errors import ConfigError

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "funnelcake.yaml"


class Service(StrEnum):
    """The deployable services; each has a kustomize overlay and an image `funnelcake-<service>`."""

    API = "api"
    RELAY = "relay"

    @property
    def image(self) -> str:
        return f"funnelcake-{self.value}"


MIGRATE_IMAGE = "funnelcake-migrate"

# host[:port]/path with lowercase path components, as Artifact Registry and distribution accept them;
# no scheme, no tag, no digest, no trailing slash.
_REGISTRY_RE = re.compile(
    r"^(?P<host>[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:[0-9]{1,5})?)"
    r"(?P<path>(/[a-z0-9]+([._-][a-z0-9]+)*)+)$"
)
_SLACK_USER_RE = re.compile(r"^[UW][A-Z0-9]{2,}$")
_SLACK_GROUP_RE = re.compile(r"^(@[a-z0-9][a-z0-9._-]*|S[A-Z0-9]{2,})$")

Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9-]{0,30}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArgoCDConfig(_Strict):
    url: AnyHttpUrl | None = None  # the Argo CD UI (e.g. https://argocd.example.org): messages link its apps
    namespace: str = "argocd"
    applications: dict[Service, str] = Field(
        default_factory=lambda: {s: f"funnelcake-{s.value}" for s in Service}
    )


class MigrationMode(StrEnum):
    CLOUD = "cloud"
    SELF_HOSTED = "self-hosted"


class Migrations(_Strict):
    """How the migrate Job reaches ClickHouse: the mode is config, never user input (F8)."""

    mode: MigrationMode
    host: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    secret: str = "funnelcake-clickhouse-credentials"  # noqa: S105 - a Secret object name, not a value
    job_name: str = "funnelcake-db-migrate"

    @model_validator(mode="after")
    def _mode_fields(self) -> Self:
        if self.mode is MigrationMode.SELF_HOSTED:
            missing = [f for f in ("host", "port") if getattr(self, f) is None]
            if missing:
                raise ValueError(f"self-hosted mode needs {' and '.join(missing)}")
        elif self.host is not None or self.port is not None:
            raise ValueError("cloud mode takes CLICKHOUSE_URL from the secret; remove host and port")
        return self


def _principal(value: str) -> str:
    if value == "*" or _SLACK_USER_RE.match(value) or _SLACK_GROUP_RE.match(value):
        return value
    raise ValueError(
        f"{value!r} is not a Slack user ID (U…/W…), a user-group handle (@name) or ID (S…), or '*'"
    )


Principal = Annotated[str, Field(min_length=1)]


class Endpoints(_Strict):
    """Where an env's services answer from outside. Each is optional: an unset one skips its check."""

    relay_ws: AnyWebsocketUrl | None = None  # the relay's websocket (NIP-01), e.g. wss://relay.example.org/
    # The relay information document (NIP-11) lives at the websocket's URL over http(s); set this only
    # when the relay's HTTP side answers somewhere else.
    relay_http: AnyHttpUrl | None = None
    api: AnyHttpUrl | None = None  # the API's base URL: `<api>/health` must answer 2xx

    @property
    def relay_info_url(self) -> str | None:
        if self.relay_http is not None:
            return str(self.relay_http)
        if self.relay_ws is None:
            return None
        ws = str(self.relay_ws)
        return "https" + ws[3:] if ws.startswith("wss") else "http" + ws[2:]


class Promotion(_Strict):
    """The gate in front of an env: a commit goes here only after it succeeded in `after`, with the same
    image digests, at least `soak_minutes` ago. An admin may override it, with a reason."""

    after: str = Field(min_length=1)
    soak_minutes: float = Field(default=0, ge=0)


class Environment(_Strict):
    name: Name
    registry: str
    kube_context: str = Field(min_length=1)
    namespace: str = "funnelcake"
    argocd: ArgoCDConfig = Field(default_factory=ArgoCDConfig)
    overlays: dict[Service, str]
    migrations: Migrations
    site_url: AnyHttpUrl | None = None
    endpoints: Endpoints = Field(default_factory=Endpoints)
    deployers: list[Principal] = Field(default_factory=lambda: ["*"])
    approval_required: bool = False
    approvers: list[Principal] = Field(default_factory=list)
    admins: list[Principal] = Field(default_factory=list)
    alerts_channel: str | None = None  # the watcher's incidents for this env (default: watch.channel)
    # the Slack channel (C…) where requests from outside Slack (the CLI) post their approval request
    channel: str | None = Field(default=None, pattern=r"^[CG][A-Z0-9]{2,}$")
    promotion: Promotion | None = None  # None: no gate (e.g. poc)

    @field_validator("registry")
    @classmethod
    def _registry(cls, v: str) -> str:
        v = v.rstrip("/")
        if not _REGISTRY_RE.match(v):
            raise ValueError(
                f"malformed registry prefix {v!r}: expected host[:port]/path, lowercase, "
                "no scheme, tag or digest (e.g. us-central1-docker.pkg.dev/project/repo)"
            )
        return v

    @field_validator("deployers", "approvers", "admins")
    @classmethod
    def _principals(cls, v: list[str]) -> list[str]:
        return [_principal(p) for p in v]

    @field_validator("overlays")
    @classmethod
    def _overlays(cls, v: dict[Service, str]) -> dict[Service, str]:
        missing = [s.value for s in Service if s not in v]
        if missing:
            raise ValueError(f"missing overlay for service(s): {', '.join(missing)}")
        return v

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if self.name == "production" and self.migrations.mode is not MigrationMode.CLOUD:
            raise ValueError(
                "production runs ClickHouse Cloud: migrations.mode must be 'cloud' "
                "(self-hosted would miss the TLS port 9440)"
            )
        if self.approval_required and not self.approvers:
            raise ValueError("approval_required is true but no approvers are listed")
        return self

    @property
    def registry_host(self) -> str:
        return self.registry.split("/", 1)[0]

    def image_ref(self, image: str, tag: str) -> str:
        return f"{self.registry}/{image}:{tag}"


class Repo(_Strict):
    url: str = Field(min_length=1)
    branch: str = "main"
    # the repo's web page (e.g. https://github.com/org/repo): messages link commits and compare views
    web_url: AnyHttpUrl | None = None


class OverlayRepo(Repo):
    # write kustomize `digest:` next to each newTag: the cluster runs the exact image the deploy checked,
    # even if someone pushes the same tag again
    pin_digests: bool = False


class Repos(_Strict):
    app: Repo
    gitops: OverlayRepo


class Watch(_Strict):
    """The watcher: one bot at a time follows every env outside deploys and posts incidents."""

    enabled: bool = True
    channel: str | None = None  # where incidents go unless the env names its own `alerts_channel`
    every: float = Field(default=3.0, gt=0)  # seconds between looks
    confirm_after: int = Field(default=2, ge=1)  # looks a problem must last before it is posted
    clear_after: int = Field(default=2, ge=1)  # looks without it before it is closed as recovered
    flap_window: float = Field(default=600, ge=0)  # a problem back within this many seconds reopens its post
    # an env behind production (lacking commits production runs) is posted after this many seconds of it
    behind_after: float = Field(default=3600, ge=0)


class Operator(_Strict):
    """Maps an OS user running the CLI to the Slack user the rules apply to."""

    os_user: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")
    slack_user: str | None = Field(default=None, pattern=_SLACK_USER_RE.pattern)
    # or the Slack user with this e-mail address (users.lookupByEmail; needs SLACK_BOT_TOKEN)
    email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")
    # may act as someone else with `--as` (automation accounts, break-glass)
    impersonate: bool = False

    @model_validator(mode="after")
    def _one_identity(self) -> Self:
        if (self.slack_user is None) == (self.email is None):
            raise ValueError("give exactly one of slack_user and email")
        return self


class FunnelcakeConfig(_Strict):
    repos: Repos
    environments: list[Environment] = Field(min_length=1)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    watch: Watch = Field(default_factory=Watch)
    operators: list[Operator] = Field(default_factory=list)

    def alerts_channel(self, env: Environment) -> str | None:
        return env.alerts_channel or self.watch.channel

    def operator(self, os_user: str) -> Operator | None:
        return next((o for o in self.operators if o.os_user == os_user), None)

    @field_validator("environments")
    @classmethod
    def _unique(cls, envs: list[Environment]) -> list[Environment]:
        names = [e.name for e in envs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate environment name(s): {', '.join(dupes)}")
        for e in envs:
            if e.promotion is not None and e.promotion.after not in names:
                raise ValueError(
                    f"{e.name}'s promotion.after names {e.promotion.after!r}, which is not an environment"
                )
            if e.promotion is not None and e.promotion.after == e.name:
                raise ValueError(f"{e.name}'s promotion.after names itself")
        return envs

    def env(self, name: str) -> Environment:
        for e in self.environments:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def env_names(self) -> list[str]:
        return [e.name for e in self.environments]


def _field_path(loc: tuple[int | str, ...], data: Any) -> str:
    """Render a pydantic location as a path a person can find in the YAML: environments[poc].registry."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            elem = node[item] if isinstance(node, list) and item < len(node) else None
            name = elem.get("name") if isinstance(elem, dict) else None
            label = f"[{name if isinstance(name, str) and name else item}]"
            if parts:
                parts[-1] += label
            else:
                parts.append(label)
            node = elem
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _problems(exc: ValidationError, data: Any) -> list[str]:
    out: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        # pydantic reports dict-key failures as (..., key, "[key]"); keep the path short
        loc = tuple(p for p in loc if not (isinstance(p, str) and p.endswith("[key]")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "enum" and ("overlays" in loc or "applications" in loc):
            msg = (
                f"unknown service {err.get('input')!r}: expected one of {', '.join(s.value for s in Service)}"
            )
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field"
        out.append(f"{_field_path(loc, data)}: {msg}")
    return out


# libyaml's parser (PyYAML's C binding) reads the file about ten times faster than the pure-Python one, which
# is a good part of a `funnelcake history`; both build the same objects with the same safe constructor.
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _safe_load(text: str) -> Any:
    """`yaml.safe_load`, with libyaml when PyYAML has it. A file libyaml rejects is parsed again by the
    pure-Python loader, so the error (its message and its line and column) is the one it always was."""
    try:
        return yaml.load(text, Loader=_FAST_LOADER)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError:
        if _FAST_LOADER is yaml.SafeLoader:
            raise
    return yaml.safe_load(text)


def parse_config(text: str, source: str = "<string>") -> FunnelcakeConfig:
    try:
        data = _safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [f"not valid YAML{where}: {getattr(e, 'problem', e)}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with 'repos' and 'environments'"])
    try:
        return FunnelcakeConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, _problems(e, data)) from None


def load_config(path: Path) -> FunnelcakeConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read the file: {e.strerror or e}"]) from None
    return parse_config(text, str(path))


class Settings(BaseModel):
    """Process settings; secrets are SecretStr so they never print.

    Each field is read from the environment variable of its name (any case, as `DATABASE_URL` for
    `database_url`); a value passed to the constructor wins over the environment. A plain model and a
    dict lookup rather than pydantic-settings: every CLI command builds one, and that package alone
    costs more to import than the command it serves needs."""

    model_config = ConfigDict(extra="ignore")

    slack_bot_token: SecretStr | None = None
    slack_app_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_mode: Literal["socket", "http"] = "socket"
    slack_api_url: str = "https://slack.com/api/"
    http_host: str = "0.0.0.0"  # noqa: S104 - the bot's HTTP listener serves Slack and probes in a pod
    http_port: int = 3000

    database_url: str = "sqlite+aiosqlite:///funnelcake-bot.db"
    funnelcake_config: Path = DEFAULT_CONFIG_PATH
    kubeconfig: Path | None = None
    work_dir: Path = Path(".funnelcake-work")

    git_ssh_key_path: Path | None = None
    git_https_token: SecretStr | None = None
    # who the GitOps commits are by, and the SSH key that signs them (unsigned when None)
    gitops_author_name: str = Field(default="funnelcake-deploy-bot", min_length=1)
    gitops_author_email: str = Field(default="funnelcake-deploy-bot@divine.video", min_length=3)
    gitops_signing_key: Path | None = None

    lease_ttl: float = Field(default=60.0, gt=0)  # a crashed bot's env lease frees itself after this
    recovery_every: float = Field(default=30.0, gt=0)  # how often a bot looks for deploys whose bot died
    # keep this many days of deploy steps (the deploy records are kept for ever); None keeps every step
    step_retention_days: float | None = Field(default=None, gt=0)
    retention_every: float = Field(default=3600.0, gt=0)  # how often old steps are pruned, when they are

    log_format: Literal["auto", "json", "text"] = "auto"
    log_level: str = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        environ = {k.lower(): v for k, v in os.environ.items()}
        found = {name: environ[name] for name in cls.model_fields if name in environ}
        return {**found, **data}

    def load(self) -> FunnelcakeConfig:
        return load_config(self.funnelcake_config)


def env_problems(e: ValidationError) -> str:
    """The environment variables Settings rejected, one line each, without the values: a secret
    mistyped into the wrong variable must not land in a terminal or a log."""
    return "\n".join(
        f"  - {'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
        for err in e.errors(include_url=False)
    )
