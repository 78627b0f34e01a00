"""Deploy records: create, update under expected state and fence, history, ownership and cancel."""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Any, TypedDict, Unpack

from sqlalchemy import ColumnElement, and_, exists, or_, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection

from bot.ledger import schema as s
from bot.ledger.base import LedgerBase, log
from bot.ledger.models import (
    IN_FLIGHT_STATES,
    Control,
    DeployRecord,
    DeployState,
    Fence,
    Fenced,
    StateConflict,
    StepState,
    UnknownDeploy,
    who,
)
from bot.ledger.rows import _as_kind, _check_envs, _check_fence, _fence_why, _owned_by, _touches
from bot.models import DeployKind

# Short ids people read aloud and type: no 0/o, 1/l/i.
_ID_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"
_ID_LEN = 6
_ID_ATTEMPTS = 5


def new_deploy_id() -> str:
    return "d-" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LEN))


class DeployUpdate(TypedDict, total=False):
    """Fields `update_deploy` may change; anything else about a deploy is fixed at creation."""

    state: DeployState
    approver: str | None
    plan: dict[str, Any] | None
    message: str | None
    channel: str | None
    thread_ts: str | None
    owner: str | None
    last_step: str | None
    sha: str | None
    short: str | None
    finished_at: datetime | None
    tags: Mapping[str, str]  # env -> tag this deploy put in the overlays
    previous_tags: Mapping[str, str]  # env -> tag the overlays held before


_COLUMN_FIELDS = (
    "state",
    "approver",
    "plan",
    "message",
    "channel",
    "thread_ts",
    "owner",
    "last_step",
    "sha",
    "short",
    "finished_at",
)


class DeploysMixin(LedgerBase):
    # ---- deploy records ----

    async def create_deploy(
        self,
        *,
        kind: DeployKind | str,
        envs: Sequence[str],
        ref: str,
        requester: str,
        sha: str | None = None,
        short: str | None = None,
        state: DeployState = DeployState.PLANNED,
        plan: dict[str, Any] | None = None,
        channel: str | None = None,
        thread_ts: str | None = None,
        owner: str | None = None,
        tags: Mapping[str, str] | None = None,
        previous_tags: Mapping[str, str] | None = None,
        deploy_id: str | None = None,
        origin: str | None = None,
    ) -> DeployRecord:
        """Record a new deploy. A deploy or rollback with a short hash puts that tag in each env unless `tags` says otherwise."""
        kind = _as_kind(kind)
        env_list = list(dict.fromkeys(envs))
        if not env_list or len(env_list) != len(envs):
            raise ValueError(f"envs must be a non-empty list without repeats, got {list(envs)!r}")
        if tags is None:
            tags = {e: short for e in env_list} if kind.changes_tags and short else {}
        previous_tags = previous_tags or {}
        _check_envs(env_list, tags, previous_tags)
        for attempt in range(_ID_ATTEMPTS):
            new_id = deploy_id or new_deploy_id()
            now = self._now()
            try:
                async with self._tx() as conn:
                    await conn.execute(
                        s.deploys.insert().values(
                            id=new_id,
                            kind=kind.value,
                            envs=env_list,
                            ref=ref,
                            sha=sha,
                            short=short,
                            requester=requester,
                            state=DeployState(state).value,
                            plan=plan,
                            channel=channel,
                            thread_ts=thread_ts,
                            created_at=now,
                            updated_at=now,
                            finished_at=now if DeployState(state).terminal else None,
                            owner=owner,
                            origin=origin,
                        )
                    )
                    await conn.execute(
                        s.deploy_targets.insert(),
                        [
                            {
                                "deploy_id": new_id,
                                "env": e,
                                "tag": tags.get(e),
                                "previous_tag": previous_tags.get(e),
                            }
                            for e in env_list
                        ],
                    )
                    return await self._get(conn, new_id)
            except sa_exc.IntegrityError:
                if deploy_id is not None or attempt == _ID_ATTEMPTS - 1:
                    raise
                log.info("deploy id collision, drawing another", extra={"deploy_id": new_id})
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def update_deploy(
        self,
        deploy_id: str,
        *,
        expect_state: DeployState | Collection[DeployState] | None = None,
        fence: Fence | None = None,
        **fields: Unpack[DeployUpdate],
    ) -> DeployRecord:
        """Change a deploy; with `expect_state`, only if it is still in that state (else StateConflict);
        with `fence`, only if that owner still holds it at that epoch (else Fenced: a stale bot's write
        changes nothing).

        Moving to a terminal state stamps finished_at unless given.
        """
        values: dict[str, Any] = {k: fields[k] for k in _COLUMN_FIELDS if k in fields}  # type: ignore[literal-required]
        unknown = set(fields) - set(_COLUMN_FIELDS) - {"tags", "previous_tags"}
        if unknown:
            raise TypeError(f"update_deploy cannot change {sorted(unknown)}")
        now = self._now()
        if "state" in values:
            state = DeployState(values["state"])
            values["state"] = state.value
            if state.terminal and "finished_at" not in values:
                values["finished_at"] = now
        values["updated_at"] = now
        expected: tuple[DeployState, ...] = ()
        if expect_state is not None:
            expected = (
                (DeployState(expect_state),)
                if isinstance(expect_state, str)
                else tuple(DeployState(x) for x in expect_state)
            )
        async with self._tx() as conn:
            stmt = update(s.deploys).where(s.deploys.c.id == deploy_id).values(**values)
            if expected:
                stmt = stmt.where(s.deploys.c.state.in_([x.value for x in expected]))
            if fence is not None:
                stmt = stmt.where(_owned_by(fence))
            result = await conn.execute(stmt)
            if result.rowcount == 0:
                current = await self._get(conn, deploy_id)  # raises UnknownDeploy
                _check_fence(current, fence)
                raise StateConflict(deploy_id, current.state, expected)
            tags = fields.get("tags") or {}
            previous = fields.get("previous_tags") or {}
            if tags or previous:
                envs = (
                    await conn.execute(
                        select(s.deploy_targets.c.env).where(s.deploy_targets.c.deploy_id == deploy_id)
                    )
                ).scalars()
                _check_envs(list(envs), tags, previous)
                for env, tag in tags.items():
                    await conn.execute(
                        update(s.deploy_targets)
                        .where(s.deploy_targets.c.deploy_id == deploy_id, s.deploy_targets.c.env == env)
                        .values(tag=tag)
                    )
                for env, tag in previous.items():
                    await conn.execute(
                        update(s.deploy_targets)
                        .where(s.deploy_targets.c.deploy_id == deploy_id, s.deploy_targets.c.env == env)
                        .values(previous_tag=tag)
                    )
            return await self._get(conn, deploy_id)

    async def get_deploy(self, deploy_id: str) -> DeployRecord:
        async with self._tx() as conn:
            return await self._get(conn, deploy_id)

    async def history(
        self, env: str | None = None, limit: int = 20, *, before: str | None = None
    ) -> list[DeployRecord]:
        """Newest first; with `env`, only records that touched that env; with `before` (a deploy id), only
        records older than that one: the next page after a page that ended with it."""
        records, _ = await self.history_page(env, limit, before=before)
        return records

    async def history_page(
        self, env: str | None = None, limit: int = 20, *, before: str | None = None
    ) -> tuple[list[DeployRecord], bool]:
        """`history`, and whether older records than the page's last exist (ask again with `before` = its id).

        UnknownDeploy if `before` names no deploy."""
        if limit < 1:
            raise ValueError(f"limit must be at least 1, not {limit}")
        d = s.deploys.c
        where: list[ColumnElement[bool]] = []
        if env is not None:
            where.append(_touches(env))
        async with self._tx() as conn:
            if before is not None:
                mark = (await conn.execute(select(d.created_at, d.seq).where(d.id == before))).one_or_none()
                if mark is None:
                    raise UnknownDeploy(before)
                where.append(
                    or_(
                        d.created_at < mark.created_at,
                        and_(d.created_at == mark.created_at, d.seq < mark.seq),
                    )
                )
            found = await self._load(conn, where, limit=limit + 1)
            return found[:limit], len(found) > limit

    async def in_flight(self, owner: str | None = None) -> list[DeployRecord]:
        """Deploys running or awaiting approval (optionally of one bot instance): what a restart must resolve."""
        where: list[ColumnElement[bool]] = [s.deploys.c.state.in_([x.value for x in IN_FLIGHT_STATES])]
        if owner is not None:
            where.append(s.deploys.c.owner == owner)
        async with self._tx() as conn:
            return await self._load(conn, where, limit=None)

    async def last_succeeded(self, env: str) -> DeployRecord | None:
        """The deploy or rollback that put the env's current tag in place, by finish time."""
        async with self._tx() as conn:
            found = await self._succeeded(conn, env, limit=1)
            return found[0] if found else None

    async def _succeeded(
        self,
        conn: AsyncConnection,
        env: str,
        *,
        limit: int,
    ) -> list[DeployRecord]:
        t = s.deploy_targets.c
        tagged = [t.deploy_id == s.deploys.c.id, t.env == env, t.tag.is_not(None)]
        # EXISTS rather than a join: the planner walks the deploys newest-finished first down their index
        # and stops at the first that put a tag in the env, instead of sorting every deploy of the env.
        q = (
            select(s.deploys.c.id)
            .where(
                exists().where(*tagged),
                s.deploys.c.state == DeployState.SUCCEEDED.value,
                s.deploys.c.kind.in_([k.value for k in DeployKind if k.changes_tags]),
                s.deploys.c.finished_at.is_not(None),
            )
            .order_by(s.deploys.c.finished_at.desc(), s.deploys.c.seq.desc())
            .limit(limit)
        )
        ids = list((await conn.execute(q)).scalars())
        return [await self._get(conn, i) for i in ids]

    async def control(self, deploy_id: str) -> Control:
        c = s.deploys.c
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    select(c.state, c.owner, c.epoch, c.cancel_requested_by).where(c.id == deploy_id)
                )
            ).one_or_none()
            if row is None:
                raise UnknownDeploy(deploy_id)
            return Control(DeployState(row.state), row.owner, row.epoch, row.cancel_requested_by)

    async def claim_deploy(self, deploy_id: str, *, owner: str, expect: Fence | None) -> DeployRecord:
        """Become the deploy's owner at the next epoch, if it is still owned as `expect` says (None: by
        nobody, e.g. after a hand-over). Every take-over goes through here; the loser gets Fenced."""
        c = s.deploys.c
        now = self._now()
        async with self._tx() as conn:
            held = c.owner.is_(None) if expect is None else _owned_by(expect)
            result = await conn.execute(
                update(s.deploys)
                .where(c.id == deploy_id, held, c.state.in_([x.value for x in IN_FLIGHT_STATES]))
                .values(owner=owner, epoch=c.epoch + 1, updated_at=now)
            )
            current = await self._get(conn, deploy_id)
            if result.rowcount == 0:
                if current.state.terminal:
                    raise StateConflict(deploy_id, current.state, IN_FLIGHT_STATES)
                raise Fenced(deploy_id, _fence_why(current.owner, current.epoch))
            # Steps the previous owner left running will never be finished by it (it is fenced out now):
            # close them, saying why, so the deploy's story has no step running forever.
            previous = expect.owner if expect is not None else "its previous bot"
            st = s.deploy_steps.c
            await conn.execute(
                update(s.deploy_steps)
                .where(st.deploy_id == deploy_id, st.state == StepState.RUNNING.value)
                .values(
                    state=StepState.ERRORED.value,
                    finished_at=now,
                    detail={
                        "message": f"stopped: {previous} stopped running the deploy; {owner} took it over"
                    },
                )
            )
            return current

    async def hand_over(self, deploy_id: str, fence: Fence) -> DeployRecord:
        """Give a running deploy up for any bot to resume at once (a graceful stop): no owner, same epoch."""
        return await self.update_deploy(deploy_id, fence=fence, expect_state=IN_FLIGHT_STATES, owner=None)

    async def request_cancel(self, deploy_id: str, user: str) -> DeployRecord:
        """Ask the deploy's owner, whichever bot it is, to stop it; the first request is kept.

        A deploy awaiting approval has no run to stop: it is cancelled here and now."""
        c = s.deploys.c
        now = self._now()
        async with self._tx() as conn:
            current = await self._get(conn, deploy_id)
            if current.state.terminal:
                raise StateConflict(deploy_id, current.state, IN_FLIGHT_STATES)
            values: dict[str, Any] = {"updated_at": now}
            if current.cancel_requested_by is None:
                values.update(cancel_requested_by=user, cancel_requested_at=now)
            if current.state is DeployState.AWAITING_APPROVAL:
                values.update(
                    state=DeployState.CANCELLED.value,
                    message=f"cancelled by {who(user)} while it waited for approval; nothing was pushed",
                    finished_at=now,
                )
            await conn.execute(
                update(s.deploys)
                .where(c.id == deploy_id, c.state.in_([x.value for x in IN_FLIGHT_STATES]))
                .values(**values)
            )
            return await self._get(conn, deploy_id)
