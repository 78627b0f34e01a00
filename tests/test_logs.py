"""Logging: planted secrets never reach the output (messages, args, extras, exceptions), every line has its deploy id."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from bot.logs import (
    LABELS_KEY,
    REDACTED,
    deploy_context,
    deploy_id_var,
    forget_secrets,
    redact,
    redact_json,
    register_secret,
    register_secrets_from,
    resolve_format,
    setup_logging,
    step_context,
)
from bot.settings import Settings

# Planted values: registered ones have no recognisable shape, so only registration can catch them.
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
CLICKHOUSE_PASSWORD = "Ch!ck3n-S0up&more"
CLICKHOUSE_USER = "funnel_admin_7731"
BOT_TOKEN = "xoxb-0000000001-0000000002-plantedbottoken"
GIT_TOKEN = "ghp_PlantedGitTokenValue0123456789abcd"
# Unregistered, caught by their shape alone.
SHAPED = {
    "app": "xapp-1-A0FUNNEL-0000000003-plantedapptoken",
    "user": "xoxp-1111-2222-3333-plantedusertoken",
    "pat": "github_pat_11AAAAAAA0plantedfinegrained_abcdefABCDEF0123",
    "bearer": "eyJhbGciOiJSUzI1NiJ9.plantedjwt.signature",
    "google": "ya29.a0AfB_plantedgoogleaccesstoken",
    "urlpw": "pgPlantedPassw0rd",
}
ALL_PLANTED = [SIGNING_SECRET, CLICKHOUSE_PASSWORD, CLICKHOUSE_USER, BOT_TOKEN, GIT_TOKEN, *SHAPED.values()]


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """A JSON logging set-up writing to a buffer; the root logger and the secrets are restored after."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    factory = logging.getLogRecordFactory()
    forget_secrets()
    for value in (SIGNING_SECRET, CLICKHOUSE_PASSWORD, CLICKHOUSE_USER, BOT_TOKEN, GIT_TOKEN):
        register_secret(value)
    buf = io.StringIO()
    setup_logging("json", "DEBUG", stream=buf)
    try:
        yield buf
    finally:
        for h in list(root.handlers):
            if h not in saved[1]:
                root.removeHandler(h)
        root.setLevel(saved[0])
        logging.setLogRecordFactory(factory)
        logging.captureWarnings(False)
        forget_secrets()


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def assert_clean(output: str) -> None:
    leaked = [s for s in ALL_PLANTED if s in output]
    assert not leaked, f"leaked {leaked} in:\n{output}"


def planted_everywhere(log: logging.Logger) -> None:
    log.info("bot token %s and app token %s", BOT_TOKEN, SHAPED["app"])
    log.info("signing secret is " + SIGNING_SECRET)
    log.warning("clickhouse login %(user)s/%(pw)s", {"user": CLICKHOUSE_USER, "pw": CLICKHOUSE_PASSWORD})
    log.info("git push with %r", {"token": GIT_TOKEN, "pat": SHAPED["pat"]})
    log.info(
        "calling the API", extra={"authorization": f"Bearer {SHAPED['bearer']}", "params": {"t": BOT_TOKEN}}
    )
    log.info("registry token %s", SHAPED["google"])
    log.info("ledger at %s", f"postgresql+asyncpg://bot:{SHAPED['urlpw']}@db:5432/ledger")
    log.info("user token in a url-encoded form: %s", "password=" + CLICKHOUSE_PASSWORD.replace("!", "%21"))
    try:
        try:
            raise ConnectionError(f"clickhouse://{CLICKHOUSE_USER}:{CLICKHOUSE_PASSWORD}@ch:9440 refused")
        except ConnectionError as inner:
            raise RuntimeError(f"migrate failed for token {SHAPED['user']}") from inner
    except RuntimeError:
        log.exception("migration job crashed with %s", SIGNING_SECRET)
    # one argument short: logging's own error path would print the raw args
    log.error("bad args %s %s", BOT_TOKEN)  # noqa: PLE1206
    log.debug("stack of a deploy", stack_info=True, extra={"note": GIT_TOKEN})


def test_planted_secrets_never_appear_in_json(logs: io.StringIO) -> None:
    planted_everywhere(logging.getLogger("bot.test"))
    out = logs.getvalue()
    assert_clean(out)
    records = lines(logs)
    assert len(records) == 11
    assert records[0]["message"] == f"bot token {REDACTED} and app token {REDACTED}"
    assert records[4]["authorization"] == f"Bearer {REDACTED}"
    assert "postgresql+asyncpg://[REDACTED]@db:5432/ledger" in records[6]["message"]
    crash = next(r for r in records if r["message"].startswith("migration job crashed"))
    # the traceback is still there (where Error Reporting reads it), with both exceptions and their types,
    # just without the secrets
    assert "RuntimeError: migrate failed for token" in crash["stack_trace"]
    assert "ConnectionError: clickhouse://[REDACTED]@ch:9440 refused" in crash["stack_trace"]
    assert "(unformattable log message)" in records[9]["message"]
    assert records[-1]["stack"].startswith("Stack (most recent call last)")


def test_planted_secrets_never_appear_in_text(logs: io.StringIO) -> None:
    buf = io.StringIO()
    setup_logging("text", "DEBUG", stream=buf)
    planted_everywhere(logging.getLogger("bot.test"))
    assert_clean(buf.getvalue())
    assert "Traceback (most recent call last)" in buf.getvalue()
    assert logs.getvalue() == "", "the second set-up replaced the first handler"


def test_warnings_and_library_loggers_are_scrubbed_too(logs: io.StringIO) -> None:
    logging.getLogger("slack_sdk.web.async_base_client").debug("Sending a request with token=%s", BOT_TOKEN)
    warnings.warn(f"insecure call with {GIT_TOKEN}", UserWarning, stacklevel=1)
    out = logs.getvalue()
    assert_clean(out)
    assert "insecure call with" in out


def test_ordinary_text_is_left_alone(logs: io.StringIO) -> None:
    msg = (
        "deploy(poc): funnelcake @ e7e79eb — pushed 3 tokens of work to "
        "us-central1-docker.pkg.dev/rich-compiler-479518-d2/containers-poc/funnelcake-api:e7e79eb"
    )
    logging.getLogger("bot.service").info(msg)
    assert lines(logs)[0]["message"] == msg
    assert redact("ssh -i /etc/funnelcake/git/ssh-privatekey -o BatchMode=yes") == (
        "ssh -i /etc/funnelcake/git/ssh-privatekey -o BatchMode=yes"
    )
    assert redact("https://relay.staging.dvines.org/") == "https://relay.staging.dvines.org/"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # golang-migrate's ClickHouse DSN as funnelcake's entrypoint builds it (self-hosted and cloud)
        (
            "error: parse clickhouse://ch.funnelcake.svc:9000?username=u7&password=Pw-1&database=f&x-multi-statement=true",
            "error: parse clickhouse://ch.funnelcake.svc:9000?username=[REDACTED]&password=[REDACTED]"
            "&database=f&x-multi-statement=true",
        ),
        (
            'dial "tcp://10.0.0.12:9440?password=s3cr3t&secure=true"',
            'dial "tcp://10.0.0.12:9440?password=[REDACTED]&secure=true"',
        ),
        # userinfo, including a password holding a raw @ and a colon
        ("clickhouse://default:p@ss:w0rd@host.cloud:9440/db", "clickhouse://[REDACTED]@host.cloud:9440/db"),
        (
            'parse "https://x-access-token:tok123@github.com/o/r.git"',
            'parse "https://[REDACTED]@github.com/o/r.git"',
        ),
        (
            "CLICKHOUSE_PASSWORD=hunter22 CLICKHOUSE_USER=bob",
            "CLICKHOUSE_PASSWORD=[REDACTED] CLICKHOUSE_USER=bob",
        ),
        (
            "wss://wss-primary.slack.com/link/?ticket=abc-123&app_id=A1",
            "wss://wss-primary.slack.com/link/?ticket=[REDACTED]&app_id=A1",
        ),
        # no credential: unchanged
        ("ssh://git@github.com:22/o/r.git", "ssh://git@github.com:22/o/r.git"),
        ("http://127.0.0.1:8080/v2/x@sha256:abc", "http://127.0.0.1:8080/v2/x@sha256:abc"),
        (
            "clickhouse://ch.funnelcake.svc:9000?database=funnelcake",
            "clickhouse://ch.funnelcake.svc:9000?database=funnelcake",
        ),
    ],
)
def test_dsn_and_url_credentials(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected, "redacting twice changes nothing"


def test_redact_json_cleans_every_string_of_a_block_kit_payload(logs: io.StringIO) -> None:
    blocks = [
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": f"failed: {CLICKHOUSE_PASSWORD.replace('&', '&amp;')}"},
        },
        {"type": "actions", "elements": [{"type": "button", "value": BOT_TOKEN, "action_id": "cancel"}]},
        ("tuple", 3, None, True),
    ]
    clean = redact_json(blocks)
    assert_clean(json.dumps(clean))
    assert clean[1]["elements"][0]["action_id"] == "cancel"
    assert clean[2] == ["tuple", 3, None, True]
    assert blocks[1]["elements"][0]["value"] == BOT_TOKEN, "the input is not modified"


def test_private_keys_and_settings_secrets(logs: io.StringIO) -> None:
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAA\n-----END OPENSSH PRIVATE KEY-----"
    assert key.split("\n")[1] not in redact(f"loaded {key} ok")
    settings = Settings(
        slack_bot_token=SecretStr("xoxb-settings-bot-token-1"),
        slack_signing_secret=SecretStr("settingsSigningSecretValue"),
        git_https_token=SecretStr("plainLookingGitToken42"),
    )
    assert register_secrets_from(settings) == 3
    logging.getLogger("bot").info("loaded %s / %s", "settingsSigningSecretValue", "plainLookingGitToken42")
    assert lines(logs)[0]["message"] == f"loaded {REDACTED} / {REDACTED}"
    register_secret("ab")  # too short to redact safely: ignored, and the line survives
    logging.getLogger("bot").info("abc tab")
    assert lines(logs)[1]["message"] == "abc tab"


async def test_every_line_carries_its_deploy_id(logs: io.StringIO) -> None:
    log = logging.getLogger("bot.service")
    log.info("idle")

    async def deploy(deploy_id: str) -> None:
        with deploy_context(deploy_id):
            for i in range(3):
                log.info("step %d", i)
                await asyncio.sleep(0)
            await asyncio.to_thread(log.info, "from a thread")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(deploy("d-aaaa"), name="deploy-d-aaaa")
        tg.create_task(deploy("d-bbbb"), name="deploy-d-bbbb")
    log.info("idle again")
    records = lines(logs)
    assert LABELS_KEY not in records[0] and LABELS_KEY not in records[-1]
    for deploy_id in ("d-aaaa", "d-bbbb"):
        mine = [r for r in records if r.get(LABELS_KEY, {}).get("deploy_id") == deploy_id]
        assert [r["message"] for r in mine] == ["step 0", "step 1", "step 2", "from a thread"]
    assert deploy_id_var.get() is None


def test_json_lines_use_cloud_logging_field_names(logs: io.StringIO) -> None:
    log = logging.getLogger("bot.service")
    with deploy_context("d-7k2m", ["staging", "poc"]), step_context("gitops"):
        log.warning("push refused, retrying", extra={"attempt": 2})
    log.info("idle", extra={"env": "production"})
    log.log(5, "below debug")
    log.critical("gave up")
    raw = logs.getvalue().splitlines()
    first = json.loads(raw[0])
    # GKE's agent turns these into the entry's severity, text and labels; nothing under the old names
    assert first["severity"] == "WARNING"
    assert first["message"] == "push refused, retrying"
    assert first[LABELS_KEY] == {"deploy_id": "d-7k2m", "env": "staging,poc", "step": "gitops"}
    assert first["attempt"] == 2
    assert first["time"].endswith("+00:00")
    assert not {"level", "msg", "ts", "deploy_id", "env", "step"} & set(first)
    idle = json.loads(raw[1])
    assert idle["severity"] == "INFO"
    assert idle[LABELS_KEY] == {"env": "production"}, "an explicit env is a label too"
    assert "env" not in idle
    assert [json.loads(line)["severity"] for line in raw[2:]] == ["CRITICAL"], "level 5 is below DEBUG"


def test_text_format_shows_the_deploy_id(logs: io.StringIO) -> None:
    buf = io.StringIO()
    setup_logging("text", "INFO", stream=buf)
    with deploy_context("d-7k2m"):
        logging.getLogger("bot.service").info("pushed", extra={"env": "poc"})
    logging.getLogger("bot.service").debug("hidden at INFO")
    (line,) = buf.getvalue().splitlines()
    assert "INFO  bot.service [d-7k2m] pushed env=poc" in line


def test_auto_picks_json_unless_a_terminal_outside_a_container(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert resolve_format("auto", io.StringIO()) == "json"
    primary, replica = os.openpty()
    try:
        with os.fdopen(replica, "w", closefd=False) as tty:
            if os.path.exists("/.dockerenv"):
                assert resolve_format("auto", tty) == "json"
            else:
                assert resolve_format("auto", tty) == "text"
            monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
            assert resolve_format("auto", tty) == "json"
            assert resolve_format("text", tty) == "text"
    finally:
        os.close(primary)
        os.close(replica)


def test_bad_settings_are_refused_with_the_variable_name() -> None:
    with pytest.raises(ValueError, match="LOG_LEVEL"):
        setup_logging("json", "LOUD", stream=io.StringIO())
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        resolve_format("yaml", io.StringIO())  # type: ignore[arg-type]
