"""The local Slack keeps Slack's contract: signatures, limits, errors, Socket Mode and the rendered thread."""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import parse_qs

import aiohttp
import pytest
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncAck, AsyncApp, AsyncRespond
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from tests.testbed.slack import (
    APP_TOKEN,
    BOT_TOKEN,
    DEFAULT_CHANNEL,
    SIGNING_SECRET,
    FakeSlack,
    block_actions,
    sign,
    slash_command,
)

CH = DEFAULT_CHANNEL


def client(slack: FakeSlack, session: aiohttp.ClientSession, token: str = BOT_TOKEN) -> AsyncWebClient:
    return AsyncWebClient(token=token, base_url=slack.api_url, session=session, timeout=5)


def section(text: str) -> dict[str, object]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": text}}


# ---- signed requests


def test_signature_matches_slack_documented_example() -> None:
    # From Slack's "Verifying requests" guide.
    body = (
        b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
        b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
        b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
        b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    assert (
        sign("8f742231b10e8888abcd99yyyzzz85a5", body, 1531420618)
        == "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    )


def test_signed_slash_command_verifies_and_carries_slack_fields() -> None:
    body, headers = slash_command(text="deploy poc e7e79eb", user_id="U0BOB", user_name="bob")
    assert SignatureVerifier(SIGNING_SECRET).is_valid_request(body, headers)
    fields = {k: v[0] for k, v in parse_qs(body.decode(), keep_blank_values=True).items()}
    assert list(fields) == [
        "token",
        "team_id",
        "team_domain",
        "channel_id",
        "channel_name",
        "user_id",
        "user_name",
        "command",
        "text",
        "api_app_id",
        "is_enterprise_install",
        "response_url",
        "trigger_id",
    ]
    assert fields["command"] == "/funnelcake"
    assert fields["text"] == "deploy poc e7e79eb"
    assert fields["user_id"] == "U0BOB"


def test_tampered_forged_and_stale_requests_fail_verification() -> None:
    verifier = SignatureVerifier(SIGNING_SECRET)
    body, headers = slash_command(text="deploy poc e7e79eb")
    assert not verifier.is_valid_request(body.replace(b"poc", b"production"), headers)
    forged_body, forged_headers = slash_command(text="status", forge=True)
    assert not verifier.is_valid_request(forged_body, forged_headers)
    stale_body, stale_headers = slash_command(text="status", age=6 * 60)
    assert not verifier.is_valid_request(stale_body, stale_headers)
    fresh_enough_body, fresh_enough_headers = slash_command(text="status", age=4 * 60)
    assert verifier.is_valid_request(fresh_enough_body, fresh_enough_headers)


def test_block_actions_request_is_a_signed_json_payload_field() -> None:
    body, headers = block_actions(
        action_id="approve", value="deploy:42", block_id="decide", user_id="U0CAROL"
    )
    assert SignatureVerifier(SIGNING_SECRET).is_valid_request(body, headers)
    form = parse_qs(body.decode())
    assert list(form) == ["payload"]
    payload = json.loads(form["payload"][0])
    assert payload["type"] == "block_actions"
    assert payload["user"]["id"] == "U0CAROL"
    assert payload["actions"][0]["action_id"] == "approve"
    assert payload["actions"][0]["value"] == "deploy:42"
    for key in (
        "api_app_id",
        "token",
        "container",
        "trigger_id",
        "team",
        "channel",
        "message",
        "response_url",
    ):
        assert key in payload
    assert int(headers["X-Slack-Request-Timestamp"]) <= int(time.time())


# ---- Web API


async def test_post_update_and_thread_round_trip(slack: FakeSlack) -> None:
    async with aiohttp.ClientSession() as session:
        web = client(slack, session)
        root = await web.chat_postMessage(channel=CH, text="Deploying poc @ e7e79eb: running")
        assert root["ok"] and root["channel"] == CH
        reply = await web.chat_postMessage(channel=CH, thread_ts=root["ts"], text="resolve: ok")
        await web.chat_update(
            channel=CH,
            ts=root["ts"],
            text="done",
            blocks=[
                section("*poc* deployed e7e79eb"),
                {
                    "type": "actions",
                    "elements": [
                        {
                            "type": "button",
                            "action_id": "rollback",
                            "text": {"type": "plain_text", "text": "Roll back"},
                            "value": "poc",
                        }
                    ],
                },
            ],
        )
    [msg] = slack.messages(CH)
    assert msg.edited and msg.text == "done"
    assert [r.ts for r in msg.replies] == [reply["ts"]]
    assert slack.calls_to("chat.update")[0].params["blocks"][0]["type"] == "section"
    assert slack.calls_to("chat.postMessage")[0].token == BOT_TOKEN
    text = slack.transcript(CH)
    assert "funnelcake: *poc* deployed e7e79eb" in text
    assert "[Roll back] (edited)" in text
    assert "\n    funnelcake: resolve: ok" in text


async def test_form_encoded_calls_are_parsed_like_json(slack: FakeSlack) -> None:
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            slack.api_url + "chat.postMessage",
            data={"token": BOT_TOKEN, "channel": CH, "blocks": json.dumps([section("hi")])},
        )
        body = await resp.json()
    assert body["ok"], body
    assert slack.calls[-1].params["blocks"] == [section("hi")]


async def test_auth_errors_and_unknown_method(slack: FakeSlack) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(SlackApiError) as bad:
            await client(slack, session, token="xoxb-wrong").chat_postMessage(channel=CH, text="x")
        assert bad.value.response["error"] == "invalid_auth"
        with pytest.raises(SlackApiError) as app_token:
            await client(slack, session, token=APP_TOKEN).chat_postMessage(channel=CH, text="x")
        assert app_token.value.response["error"] == "not_allowed_token_type"
        with pytest.raises(SlackApiError) as unknown:
            await client(slack, session).api_call("chat.frobnicate")
        assert unknown.value.response["error"] == "unknown_method"
    assert slack.messages(CH) == []


async def test_chat_update_of_unknown_ts_is_message_not_found(slack: FakeSlack) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(SlackApiError) as e:
            await client(slack, session).chat_update(channel=CH, ts="1700000000.000001", text="x")
    assert e.value.response["error"] == "message_not_found"


async def test_block_kit_limits(slack: FakeSlack) -> None:
    async with aiohttp.ClientSession() as session:
        web = client(slack, session)
        ok = await web.chat_postMessage(channel=CH, text="x", blocks=[section("b")] * 50)
        assert ok["ok"]
        ok = await web.chat_postMessage(channel="C2", text="x", blocks=[section("a" * 3000)])
        assert ok["ok"]
        for channel, blocks in [
            ("C3", [section("b")] * 51),
            ("C4", [section("a" * 3001)]),
            (
                "C5",
                [
                    {
                        "type": "actions",
                        "elements": [
                            {
                                "type": "button",
                                "action_id": "a",
                                "text": {"type": "plain_text", "text": "Go"},
                                "value": "v" * 2001,
                            }
                        ],
                    }
                ],
            ),
        ]:
            with pytest.raises(SlackApiError) as e:
                await web.chat_postMessage(channel=channel, text="x", blocks=blocks)
            assert e.value.response["error"] == "invalid_blocks"
            assert e.value.response["errors"]
        with pytest.raises(SlackApiError) as long_text:
            await web.chat_postMessage(channel="C6", text="a" * 40_001)
        assert long_text.value.response["error"] == "msg_too_long"


async def test_burst_is_rate_limited_and_the_sdk_retry_handler_recovers() -> None:
    async with FakeSlack(post_interval=1.0, post_burst=2) as slack, aiohttp.ClientSession() as session:
        raw = client(slack, session)
        await raw.chat_postMessage(channel=CH, text="1")
        await raw.chat_postMessage(channel=CH, text="2")
        with pytest.raises(SlackApiError) as e:
            await raw.chat_postMessage(channel=CH, text="3")
        assert e.value.response.status_code == 429
        assert e.value.response["error"] == "ratelimited"
        assert int(e.value.response.headers["Retry-After"]) >= 1
        # Another channel has its own budget.
        assert (await raw.chat_postMessage(channel="C0OTHER", text="elsewhere"))["ok"]

        patient = client(slack, session)
        patient.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=3))
        resp = await patient.chat_postMessage(channel=CH, text="3")
        assert resp["ok"]
    statuses = [c.status for c in slack.calls_to("chat.postMessage")]
    assert statuses.count(429) >= 2
    assert [m.text for m in slack.messages(CH)] == ["1", "2", "3"]


async def test_directory_lookups(slack: FakeSlack) -> None:
    async with aiohttp.ClientSession() as session:
        web = client(slack, session)
        user = await web.users_info(user="U0BOB")
        assert user["user"]["name"] == "bob" and user["user"]["real_name"] == "Bob Baker"
        groups = await web.usergroups_list()
        by_handle = {g["handle"]: g["id"] for g in groups["usergroups"]}
        members = await web.usergroups_users_list(usergroup=by_handle["funnelcake-approvers"])
        assert members["users"] == ["U0BOB", "U0CAROL"]
        with pytest.raises(SlackApiError) as e:
            await web.usergroups_users_list(usergroup="S0NOPE")
        assert e.value.response["error"] == "no_such_subteam"
        with pytest.raises(SlackApiError) as e:
            await web.users_info(user="U0NOBODY")
        assert e.value.response["error"] == "user_not_found"
        auth = await web.auth_test()
        assert auth["user_id"] == "U0BOT" and auth["bot_id"]


async def test_response_url_ephemeral_in_channel_and_replace_original(slack: FakeSlack) -> None:
    async with aiohttp.ClientSession() as session:
        web = client(slack, session)
        root = await web.chat_postMessage(
            channel=CH,
            text="approve?",
            blocks=[
                section("Deploy production?"),
                {
                    "type": "actions",
                    "elements": [
                        {
                            "type": "button",
                            "action_id": "approve",
                            "text": {"type": "plain_text", "text": "Approve"},
                            "value": "d1",
                        }
                    ],
                },
            ],
        )
        slash_url = slack.slash_payload("status", user_id="U0BOB")["response_url"]
        await session.post(slash_url, json={"text": "Usage: /funnelcake status"})
        await session.post(slash_url, json={"text": "Status for everyone", "response_type": "in_channel"})
        click = slack.action_payload(CH, root["ts"], "approve", user_id="U0CAROL")
        assert click["actions"][0]["value"] == "d1"
        assert click["message"]["ts"] == root["ts"]
        await session.post(
            click["response_url"], json={"replace_original": True, "text": "Approved by carol"}
        )
    assert len(slack.responses_to(slash_url)) == 2
    msgs = slack.messages(CH)
    assert msgs[0].text == "Approved by carol" and msgs[0].edited
    assert msgs[1].ephemeral_to == "U0BOB"
    assert msgs[2].ephemeral_to is None
    text = slack.transcript(CH)
    assert "(only visible to bob) funnelcake: Usage: /funnelcake status" in text
    assert "funnelcake: Approved by carol (edited)" in text
    assert "[Approve]" not in text


# ---- Socket Mode


async def test_socket_mode_round_trip_with_slack_sdk_client(slack: FakeSlack) -> None:
    received: list[SocketModeRequest] = []

    async def on_request(sm: AsyncBaseSocketModeClient, req: SocketModeRequest) -> None:
        received.append(req)
        await sm.send_socket_mode_response(
            SocketModeResponse(envelope_id=req.envelope_id, payload={"text": "on it"})
        )

    hellos: list[dict[str, object]] = []

    async def on_message(msg: aiohttp.WSMessage) -> None:
        data = json.loads(msg.data)
        if data.get("type") == "hello":
            hellos.append(data)

    async with aiohttp.ClientSession() as session:
        sm = SocketModeClient(
            app_token=APP_TOKEN,
            web_client=client(slack, session),
            on_message_listeners=[on_message],
            auto_reconnect_enabled=False,
        )
        sm.socket_mode_request_listeners.append(on_request)
        try:
            await sm.connect()
            await slack.wait_connected()
            ack = await slack.send_slash("deploy poc e7e79eb")
        finally:
            await sm.close()
    assert hellos and hellos[0]["type"] == "hello"
    assert received[0].type == "slash_commands"
    assert received[0].payload["text"] == "deploy poc e7e79eb"
    assert received[0].payload["response_url"].startswith(slack.base_url + "/response/")
    assert ack["envelope_id"] == received[0].envelope_id
    assert ack["payload"] == {"text": "on it"}
    assert slack.calls_to("apps.connections.open")[0].token == APP_TOKEN


async def test_socket_mode_unacked_envelope_times_out(slack: FakeSlack) -> None:
    async with aiohttp.ClientSession() as session:
        sm = SocketModeClient(
            app_token=APP_TOKEN, web_client=client(slack, session), auto_reconnect_enabled=False
        )
        try:
            await sm.connect()
            with pytest.raises(TimeoutError, match="did not ack"):
                await slack.send_envelope("interactive", {"type": "block_actions"}, timeout=0.3)
        finally:
            await sm.close()


async def test_socket_mode_with_bolt_app(slack: FakeSlack) -> None:
    async with aiohttp.ClientSession() as session:
        app = AsyncApp(client=client(slack, session))

        @app.command("/funnelcake")
        async def on_command(ack: AsyncAck, respond: AsyncRespond, command: dict[str, str]) -> None:
            await ack(f"parsing {command['text']}")
            await respond(f"done: {command['text']}")

        handler = AsyncSocketModeHandler(app, APP_TOKEN)
        try:
            await handler.connect_async()
            ack = await slack.send_slash("status", user_id="U0DAVE")
            for _ in range(100):
                if slack.responses:
                    break
                await asyncio.sleep(0.02)
        finally:
            await handler.close_async()
    assert ack["payload"] == {"text": "parsing status"}
    assert slack.responses[0].body["text"] == "done: status"
    assert slack.messages(CH)[0].ephemeral_to == "U0DAVE"


async def test_response_url_accepts_five_posts_then_refuses(slack: FakeSlack) -> None:
    url = slack.response_url()
    async with aiohttp.ClientSession() as session:
        statuses = []
        for i in range(6):
            async with session.post(url, json={"text": f"update {i}"}) as resp:
                statuses.append(resp.status)
        async with session.post(slack.base_url + "/response/unknown", json={"text": "x"}) as resp:
            assert resp.status == 404
    assert statuses == [200] * 5 + [404]
    assert slack.responses_to(url)[-1].error == "used_url"


async def test_signed_click_carries_the_current_message(slack: FakeSlack) -> None:
    async with aiohttp.ClientSession() as session:
        posted = await client(slack, session).chat_postMessage(
            channel=CH,
            text="Deploy production?",
            blocks=[
                {
                    "type": "actions",
                    "block_id": "decide",
                    "elements": [
                        {
                            "type": "button",
                            "action_id": "approve",
                            "value": "d7",
                            "text": {"type": "plain_text", "text": "Approve"},
                        },
                        {
                            "type": "button",
                            "action_id": "deny",
                            "value": "d7",
                            "text": {"type": "plain_text", "text": "Deny"},
                        },
                    ],
                }
            ],
        )
    body, headers = slack.signed_click(CH, posted["ts"], "deny", user_id="U0BOB")
    assert SignatureVerifier(SIGNING_SECRET).is_valid_request(body, headers)
    payload = json.loads(parse_qs(body.decode())["payload"][0])
    assert payload["actions"][0] | {"action_ts": None} == {
        "action_id": "deny",
        "block_id": "decide",
        "value": "d7",
        "type": "button",
        "action_ts": None,
        "text": {"type": "plain_text", "text": "Deny", "emoji": True},
    }
    assert payload["message"]["ts"] == posted["ts"]
    assert payload["container"]["message_ts"] == posted["ts"]
    assert payload["response_url"].startswith(slack.base_url)
    with pytest.raises(KeyError, match="no button"):
        slack.action_payload(CH, posted["ts"], "rollback")
    stale = slack.signed_slash_command("status", age=600)
    assert not SignatureVerifier(SIGNING_SECRET).is_valid_request(*stale)


async def test_socket_mode_client_reconnects_when_slack_asks(slack: FakeSlack) -> None:
    async def on_request(sm: AsyncBaseSocketModeClient, req: SocketModeRequest) -> None:
        await sm.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id))

    async with aiohttp.ClientSession() as session:
        sm = SocketModeClient(app_token=APP_TOKEN, web_client=client(slack, session))
        sm.socket_mode_request_listeners.append(on_request)
        try:
            await sm.connect()
            await slack.wait_connected()
            await slack.request_reconnect()
            # The client reconnects in its own time; on a loaded machine that can take seconds.
            async with asyncio.timeout(15):
                # the new connection is up and the old one closed (the old one alone is not enough)
                while not (
                    len(slack.calls_to("apps.connections.open")) == 2
                    and slack.sockets_opened == 2
                    and slack.socket_connections == 1
                ):
                    await asyncio.sleep(0.02)
            ack = await slack.send_envelope("interactive", {"type": "block_actions"})
        finally:
            await sm.close()
    assert len(slack.calls_to("apps.connections.open")) == 2
    assert ack["envelope_id"]
