"""``trio-echo admin ADDR stats|connections|close ID|trace``: the admin channel from a terminal.

Output is JSON (one document, or one line per trace event) so scripts can use it. The token comes from
``--token-file``, else ``$TRIO_ECHO_ADMIN_TOKEN``, else the file the server generated for that port.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Mapping
from typing import TextIO

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

from trio_echo.addresses import format_host_port, parse_address
from trio_echo.errors import AddressError, TrioEchoError

from . import protocol
from .token import ENV_TOKEN, token_path, validate_token


class AdminClientError(TrioEchoError):
    """Why an admin command failed, in one line."""


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
    command: str,
    *,
    conn_id: int | None = None,
    flags: str = "error,info,conn",
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
        async with open_websocket_url(url, extra_headers=headers, connect_timeout=10) as ws:
            return await _converse(ws, command, conn_id, flags, out)
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


async def _converse(ws: object, command: str, conn_id: int | None, flags: str, out: TextIO) -> int:
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

    if command == "stats":
        while (message := await receive())["type"] != "stats":
            pass
        message.pop("type")
        print(json.dumps(message, indent=2), file=out)
        return 0
    if command == "connections":
        message = await ask({"type": "connections"}, "connections")
        print(json.dumps(message.get("items", message), indent=2), file=out)
        return 0
    if command == "close":
        message = await ask({"type": "close", "id": conn_id}, "close")
        if message["type"] == "error":
            print(f"trio-echo admin: {message['message']}", file=sys.stderr)
            return 1
        print(f"closed connection {conn_id}", file=out)
        return 0
    # trace: until interrupted
    message = await ask({"type": "subscribe", "flags": flags}, "subscribe")
    if message["type"] == "error":
        print(f"trio-echo admin: {message['message']}", file=sys.stderr)
        return 2
    while True:
        message = await receive()
        if message["type"] == "trace":
            print(json.dumps(message["event"], separators=(",", ":")), file=out, flush=True)


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
                args.action,
                conn_id=getattr(args, "id", None),
                flags=getattr(args, "flags", "error,info,conn"),
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
