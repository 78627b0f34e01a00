"""A TCP proxy a test can cut, as a network partition between one bot and its ledger would.

`async with TcpProxy(("127.0.0.1", 5432)) as proxy:` listens on a free local port and forwards every
connection to the target. `proxy.cut()` makes the path dead the way a partition does, not the way a
stopped server does: bytes in flight on open connections go nowhere and new connections are accepted and
then hear nothing, so the client learns of the outage only from its own timeouts. `proxy.restore()`
resets those dead connections (as a TCP keepalive or a NAT timeout finally would) and forwards again.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

__all__ = ["TcpProxy"]


class TcpProxy:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._cut = False
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0  # accepted so far, forwarded or not

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._reset_all()
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> None:
        """From now on nothing gets through in either direction, on old or new connections."""
        self._cut = True

    def restore(self) -> None:
        """Reset every connection that lived through the cut and forward new ones again."""
        self._cut = False
        self._reset_all()

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            transport: Any = writer.transport
            transport.abort()  # RST, not FIN: the peer sees the connection die
        self._writers.clear()

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client_w)
        try:
            if self._cut:
                await self._hold(client_r)
                return
            try:
                server_r, server_w = await asyncio.open_connection(*self.target)
            except OSError:
                return
            self._writers.add(server_w)
            up = asyncio.create_task(self._pump(client_r, server_w), name="tcpproxy-up")
            down = asyncio.create_task(self._pump(server_r, client_w), name="tcpproxy-down")
            self._links.update((up, down))
            try:
                await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (up, down):
                    task.cancel()
                    self._links.discard(task)
                await asyncio.gather(up, down, return_exceptions=True)
                self._close(server_w)
        finally:
            self._close(client_w)

    async def _hold(self, reader: asyncio.StreamReader) -> None:
        """A connection made during the cut: read and drop whatever comes, answer nothing."""
        with contextlib.suppress(OSError):
            while self._cut and await reader.read(65536):
                pass

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                while self._cut:  # a dead path: what was sent is lost, as packets to nowhere are
                    await asyncio.sleep(0.05)
                    data = b""
                if data:
                    writer.write(data)
                    await writer.drain()

    def _close(self, writer: asyncio.StreamWriter) -> None:
        self._writers.discard(writer)
        with contextlib.suppress(Exception):
            writer.close()

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
