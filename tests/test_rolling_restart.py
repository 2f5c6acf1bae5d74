"""configs/haproxy/ for real: HAProxy with the shipped haproxy.cfg in front of three trio-echo
daemons made from the shipped instance config (ports moved to free ones), `trio-echo bench`
through HAProxy, and a rolling restart during the run: each daemon SIGTERMed, waited for and
started again in turn. Every byte verified, zero errors: drain_delay and the agent check take each
instance out of HAProxy's rotation before its listeners close, and the bench's connections that
the drain closes reconnect (`--reconnect`) and land on the others."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.test_haproxy import HAPROXY, free_port
from tests.test_reload import LogWatcher

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "haproxy"
TOKEN = "rolling-restart-token-0123456789abcdef"


def haproxy_state(sock: Path) -> dict[str, str]:
    """Server name -> HAProxy's status for it (``show stat``)."""
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(5)
        client.connect(str(sock))
        client.sendall(b"show stat\n")
        data = b""
        while chunk := client.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {row["svname"]: row["status"] for row in rows if row["svname"] not in ("FRONTEND", "BACKEND")}


def wait_for(check: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_rolling_restart_behind_haproxy_loses_nothing(tmp_path: Path) -> None:
    assert shutil.which(HAPROXY), "haproxy is missing: scripts/test installs it (apt-get install haproxy)"
    names = ("one", "two", "three")
    kinds = ("4010", "4011", "4020", "4030")
    ports = {f"{kind}{n}": free_port() for n in range(1, 4) for kind in kinds}
    front, web_front, stats = free_port(), free_port(), tmp_path / "haproxy.sock"
    cfg = (CONFIGS / "haproxy.cfg").read_text()
    cfg = re.sub(r"\b(40(?:10|11|20|30)[123])\b", lambda m: str(ports[m.group(1)]), cfg)
    cfg = cfg.replace("bind :40007", f"bind 127.0.0.1:{front}").replace(
        "/run/haproxy/trio-echo.sock", str(stats)
    )
    cfg = cfg.replace("bind :8080", f"bind 127.0.0.1:{web_front}")
    (tmp_path / "haproxy.cfg").write_text(cfg)
    template = (CONFIGS / "trio-echo-instance.toml").read_text()
    configs = {}
    for n, name in enumerate(names, start=1):
        text = template
        for kind in kinds:
            text = text.replace(f"{kind}1", str(ports[f"{kind}{n}"]))
        configs[name] = tmp_path / f"{name}.toml"
        configs[name].write_text(text)
    env = {**os.environ, "TRIO_ECHO_ADMIN_TOKEN": TOKEN, "RUNTIME_DIRECTORY": str(tmp_path)}

    def start(name: str) -> tuple[subprocess.Popen[str], LogWatcher]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trio_echo", "serve", "--config", str(configs[name])],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        log = LogWatcher(proc)
        log.wait_for("agent check on")
        return proc, log

    daemons = {name: start(name) for name in names}
    haproxy_log = open(tmp_path / "haproxy.log", "w")  # noqa: SIM115 - closed in the finally below
    haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(tmp_path / "haproxy.cfg")], stderr=haproxy_log)
    bench = None
    try:
        wait_for(
            lambda: stats.exists() and set(haproxy_state(stats).values()) == {"UP"},
            f"all three UP; HAProxy said: {(tmp_path / 'haproxy.log').read_text()}",
        )
        # the web echo through HAProxy's other frontend: the instance sees the real client
        with urllib.request.urlopen(f"http://127.0.0.1:{web_front}/through?haproxy=1", timeout=10) as answer:
            document = json.load(answer)
        assert document["query"] == [["haproxy", "1"]]
        assert document["connection"]["via"].startswith("127.0.0.1:")  # HAProxy, by PROXY v2
        assert document["connection"]["peer"].startswith("127.0.0.1:")
        assert document["connection"]["peer"] != document["connection"]["via"]
        bench = subprocess.Popen(
            [sys.executable, "-m", "trio_echo", "bench", f"127.0.0.1:{front}", "--connections", "12",
             "--size", "512", "--duration", "24", "--reconnect", "--json"],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        time.sleep(1.0)  # let the bench reach every instance before the first restart
        for name in names:
            proc, log = daemons[name]
            proc.send_signal(signal.SIGTERM)
            wait_for(lambda: haproxy_state(stats)[name] != "UP", f"{name} out of rotation", 10)  # noqa: B023
            assert proc.wait(timeout=20) == 0
            log.close()
            daemons[name] = start(name)
            wait_for(lambda: haproxy_state(stats)[name] == "UP", f"{name} back", 20)  # noqa: B023
        out, _ = bench.communicate(timeout=60)
        result = json.loads(out)
        assert result["verified"] is True, result
        assert result["errors"] == 0, result
        assert result["reconnects"] > 0  # the drains did close connections, and nothing was lost
        assert result["roundtrips"] > 1000
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
        haproxy.terminate()
        haproxy.wait(timeout=10)
        haproxy_log.close()
        for proc, log in daemons.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
            log.close()
