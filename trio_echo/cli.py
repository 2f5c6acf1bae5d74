"""Command line: ``trio-echo serve|check-config`` (PRODUCT.md). Maps errors to exit codes, once."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from ._version import __version__
from .admin.client import main as admin_main
from .admin.protocol import SORT_KEYS
from .benchcli import add_arguments as add_bench_arguments
from .benchcli import main as bench_main
from .benchcli import positive_int
from .client import add_tls_arguments
from .client import main as client_main
from .config import Config
from .configfile import config_from_toml, config_to_toml, fault_profile, with_overrides
from .daemon import EXIT_OK, EXIT_USAGE, raise_nofile_limit, run
from .errors import ConfigError
from .logsetup import configure_logging

PROG = "trio-echo"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (and exit 2), not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> argparse.Namespace:
        """argparse's parse_args, but an unknown flag names the closest one of its command."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            message = f"unrecognized arguments: {' '.join(extras)}"
            known = _option_strings(self, parsed)
            for extra in extras:
                close = difflib.get_close_matches(extra.split("=", 1)[0], known, n=1)
                if extra.startswith("-") and close:
                    message += f"; did you mean {close[0]}?"
                    break
            self.error(message)
        return parsed


def _option_strings(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> list[str]:
    """The flags of ``parser`` and of the subcommands ``parsed`` chose, in that order."""
    known: list[str] = []
    current: argparse.ArgumentParser | None = parser
    while current is not None:
        actions: list[argparse.Action] = current._actions  # argparse has no public view
        known.extend(o for action in actions for o in action.option_strings if o.startswith("--"))
        chosen: Any = None
        for action in actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest or "", None) or "")
        current = chosen
    return known


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="A production-grade TCP echo service on Trio.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", metavar="PATH", help="TOML config file (default: $TRIO_ECHO_CONFIG)")
    serve.add_argument(
        "--listen",
        metavar="ADDR",
        action="append",
        help="listen here instead of the configured list (repeatable): "
        "HOST:PORT, [V6]:PORT, :PORT, unix:/path",
    )
    serve.add_argument("--admin", metavar="ADDR|off", help="admin port address, or 'off'")
    serve.add_argument(
        "--workers", metavar="N|auto", help="worker processes (default 1; auto: one per usable CPU)"
    )

    check = commands.add_parser("check-config", help="validate a config file and print the effective config")
    check.add_argument("path", metavar="PATH")

    client = commands.add_parser("client", help="interactive echo client (stdin to server, echo to stdout)")
    client.add_argument("address", metavar="ADDR", help="HOST:PORT, [V6]:PORT or unix:/path")
    client.add_argument(
        "--bye", metavar="MESSAGE", help="send MESSAGE, half-close, verify the echo and the farewell"
    )
    client.add_argument("--timeout", type=float, default=10.0, metavar="S", help="for --bye (default 10)")
    add_tls_arguments(client)

    bench = commands.add_parser("bench", help="byte-verifying load generator with latency percentiles")
    add_bench_arguments(bench)

    admin = commands.add_parser("admin", help="talk to a running server's admin port")
    admin.add_argument("address", metavar="ADDR", help="the admin port, e.g. 127.0.0.1:40008")
    admin.add_argument(
        "--token-file", metavar="PATH", help="default: $TRIO_ECHO_ADMIN_TOKEN or the generated file"
    )
    actions = admin.add_subparsers(dest="action", required=True, parser_class=_Parser)
    actions.add_parser("stats", help="print the live counts once (JSON)")
    connections = actions.add_parser("connections", help="print the open connections (JSON), paging")
    connections.add_argument("--limit", type=positive_int, metavar="N", help="at most N (default: all)")
    connections.add_argument(
        "--sort", choices=SORT_KEYS, default="age", help="descending (age: oldest first)"
    )
    connections.add_argument("--filter", metavar="TEXT", help="only peers or listeners containing TEXT")
    close = actions.add_parser("close", help="close one connection gracefully")
    close.add_argument("id", type=int, metavar="ID")
    faults = actions.add_parser(
        "faults", help="set a listener's or one connection's fault profile (prints what is in force)"
    )
    target = faults.add_mutually_exclusive_group(required=True)
    target.add_argument("--listener", metavar="ADDR|NAME", help="a listen entry's address or name")
    target.add_argument("--id", type=int, metavar="N", help="one open connection")
    faults.add_argument(
        "profile",
        type=fault_spec_argument,
        metavar="PROFILE",
        help="a [faults.NAME] name, JSON keys ('{\"latency\": 0.1}') or off",
    )
    trace = actions.add_parser("trace", help="print trace events as JSON lines until interrupted")
    trace.add_argument("--flags", default="error,info,conn", metavar="F", help="e.g. error,conn or 0x5")
    trace.add_argument("-o", "--output", metavar="FILE", help="append events to FILE instead of stdout")
    return parser


def fault_spec_argument(text: str) -> object:
    """``admin faults``' PROFILE: a profile name, a JSON object of fault keys, or ``off``."""
    if text == "off":
        return None
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not a JSON object of fault keys: {exc}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError("not a JSON object of fault keys")
        try:
            fault_profile(value)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value
    return text


def load_config(path: str | None) -> Config:
    """Read and validate the config file at ``path``; ``None`` means the built-in defaults.

    Raises:
        ConfigError: unreadable file or invalid contents.
    """
    if path is None:
        return Config()
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as exc:
        raise ConfigError("", path, f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", path, f"config file {path} is not UTF-8: {exc.reason}") from None
    return config_from_toml(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``trio-echo`` and ``python -m trio_echo``; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "admin":
        return admin_main(args)
    if args.command == "client":
        return client_main(args)
    if args.command == "bench":
        return bench_main(args)
    try:
        if args.command == "check-config":
            config = load_config(args.path)
            limit = raise_nofile_limit()
            sys.stdout.write(config_to_toml(config, max_connections=config.effective_max_connections(limit)))
            return EXIT_OK
        path = args.config or os.environ.get("TRIO_ECHO_CONFIG") or None

        def load() -> Config:
            return with_overrides(
                load_config(path), listen=args.listen, admin=args.admin, workers=args.workers
            )

        config = load()
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(config.log)
    try:
        return run(config, load if path is not None else None)
    except ConfigError as exc:  # found while building the server (admin token, ...)
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
