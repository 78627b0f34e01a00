"""The environments file: the shipped one loads; every bad case yields ONE message with field paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bot.errors import ConfigError
from bot.settings import DEFAULT_CONFIG_PATH, MigrationMode, Service, Settings, load_config, parse_config

SHIPPED = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())


def _bad(mutate) -> ConfigError:  # type: ignore[no-untyped-def]
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    mutate(data)
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(data), "funnelcake.yaml")
    return info.value


def test_shipped_config_has_the_three_real_environments() -> None:
    cfg = load_config(DEFAULT_CONFIG_PATH)
    assert cfg.env_names == ["production", "staging", "poc"]
    prod, staging, poc = cfg.environments
    assert prod.registry == "us-central1-docker.pkg.dev/dv-platform-prod/containers-production"
    assert staging.registry == "us-central1-docker.pkg.dev/dv-platform-staging/containers-staging"
    assert poc.registry == "us-central1-docker.pkg.dev/rich-compiler-479518-d2/containers-poc"
    assert prod.kube_context == "connectgateway_dv-platform-prod_us-central1_gke-production-membership"
    assert staging.kube_context == "connectgateway_dv-platform-staging_us-central1_gke-staging-membership"
    assert poc.kube_context == "connectgateway_rich-compiler-479518-d2_us-central1_gke-poc-membership"
    assert prod.migrations.mode is MigrationMode.CLOUD
    assert (staging.migrations.host, staging.migrations.port) == (
        "funnelcake-funnelcake-clickhouse.funnelcake.svc.cluster.local",
        9000,
    )
    assert prod.approval_required and not staging.approval_required
    assert str(staging.site_url) == "https://relay.staging.dvines.org/"
    assert prod.site_url is None and poc.site_url is None
    # the site is the relay: NIP-11 is read over https where the websocket is wss; no API URL is known
    assert str(staging.endpoints.relay_ws) == "wss://relay.staging.dvines.org/"
    assert staging.endpoints.relay_info_url == "https://relay.staging.dvines.org/"
    assert staging.endpoints.api is None
    assert prod.endpoints.relay_ws is None and prod.endpoints.relay_info_url is None
    assert poc.overlays[Service.RELAY] == "k8s/applications/funnelcake-relay/overlays/poc/kustomization.yaml"
    assert prod.argocd.applications[Service.API] == "funnelcake-api"
    assert prod.image_ref(Service.API.image, "e7e79eb") == (
        "us-central1-docker.pkg.dev/dv-platform-prod/containers-production/funnelcake-api:e7e79eb"
    )


def test_a_relay_endpoint_must_be_a_websocket_url() -> None:
    err = _bad(lambda d: d["environments"][2].update(endpoints={"relay_ws": "https://relay.poc.example/"}))
    assert len(err.problems) == 1
    assert err.problems[0].startswith(
        "environments[poc].endpoints.relay_ws: URL scheme should be 'ws' or 'wss'"
    )


def test_relay_http_overrides_where_nip11_is_read() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["environments"][2]["endpoints"] = {
        "relay_ws": "ws://relay.poc.example:7777/",
        "relay_http": "https://info.poc.example/relay",
    }
    poc = parse_config(yaml.safe_dump(data)).env("poc")
    assert poc.endpoints.relay_info_url == "https://info.poc.example/relay"
    data["environments"][2]["endpoints"].pop("relay_http")
    assert (
        parse_config(yaml.safe_dump(data)).env("poc").endpoints.relay_info_url
        == "http://relay.poc.example:7777/"
    )


def test_an_unknown_endpoint_is_refused() -> None:
    err = _bad(lambda d: d["environments"][2].update(endpoints={"relay": "wss://relay.poc.example/"}))
    assert err.problems == ["environments[poc].endpoints.relay: unknown field"]


def test_env_without_registry() -> None:
    err = _bad(lambda d: d["environments"][2].pop("registry"))
    assert err.problems == ["environments[poc].registry: required field is missing"]


def test_production_self_hosted_is_refused() -> None:
    err = _bad(
        lambda d: d["environments"][0].update(
            migrations={"mode": "self-hosted", "host": "ch.local", "port": 9000}
        )
    )
    assert len(err.problems) == 1
    assert err.problems[0].startswith("environments[production]: production runs ClickHouse Cloud")


def test_self_hosted_without_host_and_port() -> None:
    err = _bad(lambda d: d["environments"][1].update(migrations={"mode": "self-hosted"}))
    assert err.problems == ["environments[staging].migrations: self-hosted mode needs host and port"]


def test_unknown_service() -> None:
    err = _bad(lambda d: d["environments"][1]["overlays"].update(web="k8s/web/kustomization.yaml"))
    assert err.problems == [
        "environments[staging].overlays.web: unknown service 'web': expected one of api, relay"
    ]


def test_duplicate_env_names() -> None:
    err = _bad(lambda d: d["environments"].append(dict(d["environments"][2])))
    assert err.problems == ["environments: duplicate environment name(s): poc"]


@pytest.mark.parametrize(
    "prefix",
    [
        "https://us-central1-docker.pkg.dev/p/r",
        "us-central1-docker.pkg.dev/p/r:latest",
        "us-central1-docker.pkg.dev",
        "US-central1-docker.pkg.dev/P/r",
        "us-central1-docker.pkg.dev//r",
    ],
)
def test_malformed_registry_prefix(prefix: str) -> None:
    err = _bad(lambda d: d["environments"][2].update(registry=prefix))
    assert len(err.problems) == 1
    assert err.problems[0].startswith("environments[poc].registry: malformed registry prefix")


def test_every_problem_is_listed_in_one_message() -> None:
    def mutate(d):  # type: ignore[no-untyped-def]
        d["environments"][0].pop("registry")
        d["environments"][1].update(migrations={"mode": "self-hosted"})
        d["environments"][2]["overlays"]["web"] = "x"

    err = _bad(mutate)
    assert len(err.problems) == 3
    text = str(err)
    assert text.startswith("Invalid configuration in funnelcake.yaml (3 problems):")
    for p in err.problems:
        assert p in text


def test_local_registry_prefix_with_port_is_valid() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["environments"][2]["registry"] = "127.0.0.1:5000/containers-poc/"
    cfg = parse_config(yaml.safe_dump(data))
    assert cfg.env("poc").registry == "127.0.0.1:5000/containers-poc"
    assert cfg.env("poc").registry_host == "127.0.0.1:5000"


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid YAML at line 1"):
        parse_config("environments: [unclosed", "x.yaml")
    with pytest.raises(ConfigError, match=r"cannot read the file"):
        load_config(tmp_path / "nope.yaml")


def test_settings_read_env_and_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-planted-secret")
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://127.0.0.1/test")
    s = Settings()
    assert s.database_url == "postgresql+asyncpg://127.0.0.1/test"
    assert s.slack_bot_token is not None
    assert s.slack_bot_token.get_secret_value() == "xoxb-planted-secret"
    assert "xoxb-planted-secret" not in repr(s)


def test_cli_config_check_prints_one_message_not_a_traceback(tmp_path: Path) -> None:
    data = dict(SHIPPED)
    data["environments"] = [dict(e) for e in SHIPPED["environments"]]
    data["environments"][0]["migrations"] = {"mode": "self-hosted"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    proc = subprocess.run(
        [sys.executable, "-m", "bot.cli", "config-check"],
        env={"FUNNELCAKE_CONFIG": str(bad), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "environments[production].migrations: self-hosted mode needs host and port" in proc.stderr


def test_a_wait_longer_than_its_step_is_one_clear_error_naming_both() -> None:
    def slow_rollout(d: dict) -> None:  # type: ignore[type-arg]
        d["timeouts"] = {"rollout": 1200}

    err = _bad(slow_rollout)
    assert len(err.problems) == 1
    (problem,) = err.problems
    assert "timeouts.rollout (1200 s)" in problem and "timeouts.steps.rollout (900 s)" in problem
    assert "lower timeouts.rollout or raise timeouts.steps.rollout" in problem
    assert "funnelcake.yaml" in err.message


@pytest.mark.parametrize(
    ("section", "field", "value", "expected"),
    [
        # resolve (180 s) holds one 150 s fetch; gitops (360 s) does not hold the registry re-check, a fetch,
        # the render checks and a push one after another
        (
            None,
            "git",
            150,
            "timeouts.registry.retries + timeouts.registry.request + 2 * timeouts.git + timeouts.render (420 s) "
            "exceeds timeouts.steps.gitops (360 s), the whole budget of the gitops step they run in: lower "
            "timeouts.registry.retries or timeouts.registry.request or timeouts.git or timeouts.render or raise "
            "timeouts.steps.gitops",
        ),
        (
            "argocd",
            "refresh",
            150,
            "timeouts.argocd.refresh + timeouts.sync (330 s) exceeds timeouts.steps.sync (300 s), the whole "
            "budget of the sync step they run in: lower timeouts.argocd.refresh or timeouts.sync or raise "
            "timeouts.steps.sync",
        ),
    ],
    ids=["fetch-and-push-vs-gitops", "argocd-refresh-vs-sync"],
)
def test_an_adapter_budget_longer_than_its_step_is_one_clear_error_naming_both(
    section: str | None, field: str, value: float, expected: str
) -> None:
    def slow(d: dict) -> None:  # type: ignore[type-arg]
        (d["timeouts"][section] if section else d["timeouts"])[field] = value

    err = _bad(slow)
    assert err.problems == [f"timeouts: {expected}"]


def test_a_registry_retry_budget_longer_than_preflight_is_refused() -> None:
    def patient_registry(d: dict) -> None:  # type: ignore[type-arg]
        d["timeouts"]["registry"]["retries"] = 120

    (problem,) = _bad(patient_registry).problems
    assert problem.startswith(
        "timeouts: timeouts.registry.retries + timeouts.registry.request (150 s) exceeds "
        "timeouts.steps.preflight (90 s)"
    )


def test_the_default_budgets_fit_without_an_environments_file_timeouts_section() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    del data["timeouts"]
    timeouts = parse_config(yaml.safe_dump(data)).timeouts
    assert timeouts == load_config(DEFAULT_CONFIG_PATH).timeouts  # the shipped file spells out the defaults


def test_step_budgets_come_from_the_file_and_bound_each_step() -> None:
    data = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    data["timeouts"] = {"rollout": 1200, "steps": {"rollout": 1500, "force-migrate": 1000}}
    steps = parse_config(yaml.safe_dump(data)).timeouts.steps
    assert steps.of("rollout") == 1500 and steps.of("force-migrate") == 1000
    assert steps.of("approval") is None  # a wait for a person, bounded by timeouts.approval instead


@pytest.mark.parametrize("entry", [["-m", "bot"], ["-m", "bot.cli", "history"]], ids=["bot", "cli"])
def test_a_bad_environment_variable_is_named_without_its_value(tmp_path: Path, entry: list[str]) -> None:
    # A token pasted into the wrong variable: the message names the variable and keeps the value out.
    planted = "xoxb-planted-in-the-wrong-variable"
    env = {
        "PATH": "/usr/bin:/bin",
        "HTTP_PORT": planted,
        "LEASE_TTL": "-1",
        "FUNNELCAKE_CONFIG": str(DEFAULT_CONFIG_PATH),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/ledger.db",
        "WORK_DIR": str(tmp_path / "work"),
    }
    proc = subprocess.run(
        [sys.executable, *entry], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == "error: invalid environment variables:"
    assert "  - HTTP_PORT: Input should be a valid integer, unable to parse string as an integer" in lines
    assert "  - LEASE_TTL: Input should be greater than 0" in lines
    assert planted not in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
