"""The admin token: from ``admin.token_file``, else ``$TRIO_ECHO_ADMIN_TOKEN``, else generated at start
into ``admin-PORT.token`` (mode 0600) in ``$RUNTIME_DIRECTORY``, ``$XDG_RUNTIME_DIR/trio-echo/`` or
``<tempdir>/trio-echo-UID/``."""

from __future__ import annotations

import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping

from trio_echo.errors import ConfigError

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")
ENV_TOKEN = "TRIO_ECHO_ADMIN_TOKEN"
MIN_GENERATED = 32


def validate_token(token: str, key: str) -> str:
    token = token.strip()
    if not token or not TOKEN_RE.match(token):
        raise ConfigError(key, "<hidden>", "an admin token must be non-empty and use only A-Z a-z 0-9 _ -")
    return token


def configured_token(token_file: str, env: Mapping[str, str]) -> str | None:
    """The operator's token, if they configured one (file first, then the environment).

    Raises:
        ConfigError: unreadable file or a token outside the URL-safe base64 alphabet.
    """
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as file:
                return validate_token(file.read(), "admin.token_file")
        except OSError as exc:
            raise ConfigError("admin.token_file", token_file, f"cannot read: {exc.strerror}") from None
    if env.get(ENV_TOKEN):
        return validate_token(env[ENV_TOKEN], ENV_TOKEN)
    return None


def token_directory(env: Mapping[str, str]) -> str:
    if env.get("RUNTIME_DIRECTORY"):
        return env["RUNTIME_DIRECTORY"].split(":")[0]
    if env.get("XDG_RUNTIME_DIR"):
        return os.path.join(env["XDG_RUNTIME_DIR"], "trio-echo")
    return os.path.join(tempfile.gettempdir(), f"trio-echo-{os.getuid() if hasattr(os, 'getuid') else 0}")


def token_path(port: int, env: Mapping[str, str]) -> str:
    return os.path.join(token_directory(env), f"admin-{port}.token")


def generate_token_file(port: int, env: Mapping[str, str]) -> tuple[str, str]:
    """Create a fresh token for the admin port ``port``; return ``(token, path)``.

    The directory is created 0700 and must belong to us (a shared temp dir could otherwise hold
    another user's trap); the file is written 0600 without following symlinks.
    """
    directory = token_directory(env)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if hasattr(os, "getuid") and (
        not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022
    ):
        raise ConfigError(
            "admin.token_file",
            "",
            f"refusing to write the admin token into {directory}: not a private directory of ours",
        )
    token = secrets.token_urlsafe(MIN_GENERATED)
    path = os.path.join(directory, f"admin-{port}.token")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600) if hasattr(os, "fchmod") else None
        os.write(fd, (token + "\n").encode())
    finally:
        os.close(fd)
    return token, path
