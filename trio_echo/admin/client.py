"""``trio-echo admin ADDR stats|connections|close ID|faults|trace``: the admin channel from a terminal.

Output is JSON (one document, or one line per trace event) so scripts can use it. The token comes from
``--token-file``, else ``$TRIO_ECHO_ADMIN_TOKEN``, else the file the server generated for that port.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import TextIO

import attrs
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from trio_echo.addresses import format_host_port, parse_address
from trio_echo.errors import AddressError, TrioEchoError

from . import protocol
from .token import ENV_TOKEN, token_path, validate_token


class AdminClientError(TrioEchoError):
    """Why an admin command failed, in one line."""


PAGE = 1000  # connections per request while paging (a page of items stays far below MAX_RECEIVED)
MAX_RECEIVED = 16 * 1024 * 1024  # the largest channel message this client accepts


@attrs.frozen
class Command:
    """What to ask the admin port: ``stats``, ``connections``, ``close``, ``faults`` or ``trace``.

    ``connections`` pages through every match of ``filter`` sorted by ``sort``, or stops at ``limit``.
    """

    action: str
    conn_id: int | None = None
    flags: str = "error,info,conn"
    limit: int | None = None
    sort: str = "age"
    filter: str = ""
    faults: dict[str, object] | None = None  # ``faults``: the set_faults request's target and profile


def resolve_token(port: int, token_file: str | None, env: Mapping[str, str]) -> str:
    path = token_file or (None if env.get(ENV_TOKEN) else token_path(port, env))
    if path is None:
        return validate_token(env[ENV_TOKEN], ENV_TOKEN)
    try:
        with open(path, encoding="utf-8") as file:
            return validate_token(file.read(), path)
    except OSError as exc:
        raise AdminClientError(
            f"no admin token: cannot read {path} ({exc.strerror}); use --token-file or ${ENV_TOKEN}"
        ) from None


async def run_command(
    address: str,
    command: Command,
    *,
    token_file: str | None = None,
    out: TextIO | None = None,
    env: Mapping[str, str] | None = None,
) -> int:
    """Run one admin command against the admin port at ``address``; return the exit code.

    Raises:
        AdminClientError: bad address, no token, refused or rejected connection.
    """
    out = out or sys.stdout
    try:
        parsed = parse_address(address)
    except AddressError as exc:
        raise AdminClientError(str(exc)) from None
    if parsed.path is not None or parsed.transport != "tcp":
        raise AdminClientError(f"{address}: the admin port is plain TCP (HOST:PORT)")
    host = format_host_port(parsed.host or "127.0.0.1", parsed.port)
    token = resolve_token(parsed.port, token_file, os.environ if env is None else env)
    url = f"ws://{host}/ws"
    headers = [(b"authorization", f"Bearer {token}".encode())]
    try:
        async with open_websocket_url(
            url, extra_headers=headers, connect_timeout=10, max_message_size=MAX_RECEIVED
        ) as ws:
            return await _converse(ws, command, out)
    except ConnectionRejected as exc:
        reason = {
            401: "wrong or missing admin token",
            403: "forbidden (Host/Origin)",
            503: "too many admin clients",
        }
        raise AdminClientError(f"{url}: {reason.get(exc.status_code, f'HTTP {exc.status_code}')}") from None
    except (HandshakeError, OSError) as exc:
        raise AdminClientError(f"cannot connect to the admin port at {host}: {exc}") from None
    except ConnectionClosed as exc:
        raise AdminClientError(f"the admin channel closed: {exc.reason}") from None


async def _converse(ws: object, command: Command, out: TextIO) -> int:
    from trio_websocket import WebSocketConnection  # noqa: PLC0415 - for the type only

    assert isinstance(ws, WebSocketConnection)

    async def receive() -> dict[str, object]:
        message: dict[str, object] = json.loads(await ws.get_message())
        return message

    async def ask(request: dict[str, object], reply: str) -> dict[str, object]:
        await ws.send_message(protocol.encode(request))
        while True:
            message = await receive()
            if message["type"] in (reply, "error"):
                return message

    def failed(message: dict[str, object]) -> bool:
        if message["type"] == "error":
            print(f"trio-echo admin: {message['message']}", file=sys.stderr)
            return True
        return False

    if command.action == "stats":
        while (message := await receive())["type"] != "stats":
            pass
        message.pop("type")
        print(json.dumps(message, indent=2), file=out)
        return 0
    if command.action == "connections":
        items = await _all_connections(ask, command)
        if items is None:
            return 1
        print(json.dumps(items, indent=2), file=out)
        return 0
    if command.action == "faults":
        reply = await ask({"type": "set_faults", **(command.faults or {})}, "set_faults")
        if failed(reply):
            return 1
        reply.pop("type")
        print(json.dumps(reply, indent=2), file=out)
        return 0
    if command.action == "close":
        if failed(await ask({"type": "close", "id": command.conn_id}, "close")):
            return 1
        print(f"closed connection {command.conn_id}", file=out)
        return 0
    # trace: until interrupted
    if failed(await ask({"type": "subscribe", "flags": command.flags}, "subscribe")):
        return 2
    while True:
        message = await receive()
        if message["type"] == "trace":
            print(json.dumps(message["event"], separators=(",", ":")), file=out, flush=True)


Ask = Callable[[dict[str, object], str], Awaitable[dict[str, object]]]


async def _all_connections(ask: Ask, command: Command) -> list[object] | None:
    """Page through the table (``offset`` steps of ``PAGE``) until ``total`` or ``limit`` is reached;
    None (after one line on stderr) when the server refused the request. Connections that close
    meanwhile shift later pages, so an id seen twice is listed once."""
    items: list[object] = []
    seen: set[object] = set()
    offset = 0
    wanted = command.limit
    while wanted is None or len(items) < wanted:
        size = PAGE if wanted is None else min(PAGE, wanted - len(items))
        request = {"type": "connections", "limit": size, "offset": offset, "sort": command.sort}
        if command.filter:
            request["filter"] = command.filter
        message = await ask(request, "connections")
        if message["type"] == "error":
            print(f"trio-echo admin: {message['message']}", file=sys.stderr)
            return None
        page = message.get("items")
        total = message.get("total")
        if not isinstance(page, list) or not isinstance(total, int):
            print("trio-echo admin: the server's connections reply has no items/total", file=sys.stderr)
            return None
        for item in page:
            key = item.get("id") if isinstance(item, dict) else None
            if key not in seen:
                seen.add(key)
                items.append(item)
        offset += len(page)
        if not page or offset >= total:
            break
    return items if wanted is None else items[:wanted]


def _faults_request(args: argparse.Namespace) -> dict[str, object]:
    target: dict[str, object] = {"listener": args.listener} if args.listener is not None else {"id": args.id}
    return {**target, "faults": args.profile}


def main(args: argparse.Namespace) -> int:
    """Entry point from the CLI; returns the exit code (1 with one line on stderr when it fails)."""
    out: TextIO | None = None
    try:
        if getattr(args, "output", None):
            out = open(args.output, "a", encoding="utf-8")  # noqa: SIM115 - closed below
        return trio.run(
            functools.partial(
                run_command,
                args.address,
                Command(
                    args.action,
                    conn_id=getattr(args, "id", None),
                    flags=getattr(args, "flags", "error,info,conn"),
                    limit=getattr(args, "limit", None),
                    sort=getattr(args, "sort", "age"),
                    filter=getattr(args, "filter", "") or "",
                    faults=_faults_request(args) if args.action == "faults" else None,
                ),
                token_file=args.token_file,
                out=out,
            )
        )
    except AdminClientError as exc:
        print(f"trio-echo admin: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"trio-echo admin: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if out is not None:
            out.close()
