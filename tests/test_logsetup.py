import json
import logging

import pytest

from trio_echo.config import LogConfig
from trio_echo.logsetup import configure_logging


@pytest.fixture(autouse=True)
def restore_root_logger():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_to_a_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "log.jsonl"
    configure_logging(LogConfig(level="warning", format="json", file=str(path)))
    logging.getLogger("trio_echo.test").info("not shown")
    logging.getLogger("trio_echo.test").warning("shown %d", 1)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("trio_echo.test").exception("with traceback")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["level"], e["logger"], e["message"]) for e in lines] == [
        ("warning", "trio_echo.test", "shown 1"),
        ("error", "trio_echo.test", "with traceback"),
    ]
    assert "ValueError: boom" in lines[1]["traceback"]


@pytest.mark.parametrize(("journal", "timestamped"), [("", True), ("8:1234", False)])
def test_text_format_leaves_timestamps_to_journald(
    monkeypatch: pytest.MonkeyPatch, journal: str, timestamped: bool
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", journal)
    handler = configure_logging(LogConfig())
    record = logging.LogRecord("trio_echo.x", logging.INFO, __file__, 1, "hello", None, None)
    line = handler.format(record)
    assert line.endswith("INFO trio_echo.x: hello")
    assert (line != "INFO trio_echo.x: hello") is timestamped


def test_reopen_after_logrotate_moved_the_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from trio_echo.logsetup import reopen_logs

    path = tmp_path / "trio-echo.log"
    configure_logging(LogConfig(file=str(path)))
    logging.getLogger("trio_echo.test").info("before rotation")
    path.rename(tmp_path / "trio-echo.log.1")
    reopen_logs()
    logging.getLogger("trio_echo.test").info("after rotation")
    assert "before rotation" in (tmp_path / "trio-echo.log.1").read_text()
    assert "after rotation" in path.read_text()
    assert "before rotation" not in path.read_text()
