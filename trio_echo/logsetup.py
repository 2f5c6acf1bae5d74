"""The human log: level, text or JSON lines, stderr or a file (``[log]``)."""

from __future__ import annotations

import json
import logging
import os
import sys

from .config import LogConfig


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class _WorkerTag(logging.Filter):
    """Names the worker process in each of its lines (``trio_echo.server[worker 1]``): workers and
    their master write to the same stderr or file."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self._suffix = f"[worker {index}]"

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith(self._suffix):
            record.name += self._suffix
        return True


def configure_logging(config: LogConfig, *, worker: int | None = None) -> logging.Handler:
    """Install the handler ``config`` describes on the root logger and return it.

    On stderr under systemd (``JOURNAL_STREAM`` set) text lines carry no timestamp: journald adds its
    own. ``worker``: this is worker process INDEX (its lines say so).
    """
    handler: logging.Handler
    if config.file:
        handler = logging.FileHandler(config.file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM") and not config.file:
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    if worker is not None:
        handler.addFilter(_WorkerTag(worker))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    return handler


def reopen_logs() -> None:
    """Reopen log files (after logrotate moved them): file handlers reopen on their next record."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()  # FileHandler reopens its file lazily at the next emit
