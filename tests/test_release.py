"""A release that installs: build the sdist and the wheel from a clean copy of the tree (PEP 517,
isolated, as a packager would), install the wheel into a fresh virtual environment, and from that
install serve an echo, answer /healthz and serve the dashboard (so the package data is in the
wheel). Nothing here imports the checkout: the server runs from the new environment, elsewhere."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import urllib.request
import zipfile
from pathlib import Path

from tests.test_reload import LogWatcher

REPO = Path(__file__).resolve().parent.parent
TRACKED = ("trio_echo", "configs", "docs", "README.md", "pyproject.toml", "MANIFEST.in")


def test_the_wheel_installs_and_serves(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in TRACKED:  # a copy without .venv, caches or build leftovers
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, source / name)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", str(dist), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        packaged = archive.namelist()
    for asset in ("index.html", "app.js", "style.css", "favicon.svg"):
        assert f"trio_echo/admin/dashboard/{asset}" in packaged
    with tarfile.open(sdist) as archive:
        shipped = archive.getnames()
    for wanted in (
        "configs/trio-echo.toml",
        "configs/systemd/trio-echo.service",
        "configs/kubernetes/deployment.yaml",
        "docs/deploy.md",
    ):
        assert any(name.endswith(wanted) for name in shipped), wanted

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=600,
    )
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import trio_echo; print(trio_echo.__file__)"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert where.startswith(str(venv)), where

    server = subprocess.Popen(
        [str(venv / "bin" / "trio-echo"), "serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "RUNTIME_DIRECTORY": str(tmp_path)},
        stderr=subprocess.PIPE,
        text=True,
    )
    log = LogWatcher(server)
    try:
        echo_line = log.lines[log.wait_for(r"listening on 127\.0\.0\.1:\d+", timeout=30)]
        admin_line = log.lines[log.wait_for(r"admin port on 127\.0\.0\.1:\d+", timeout=30)]
        echo_port = int(re.findall(r"127\.0\.0\.1:(\d+)", echo_line)[0])
        admin_port = int(re.findall(r"127\.0\.0\.1:(\d+)", admin_line)[0])
        with socket.create_connection(("127.0.0.1", echo_port), timeout=10) as client:
            client.sendall(b"from the wheel\n")
            assert client.recv(100) == b"from the wheel\n"
        base = f"http://127.0.0.1:{admin_port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as answer:
            assert answer.read() == b"ok\n"
        with urllib.request.urlopen(f"{base}/", timeout=10) as answer:
            page = answer.read().decode()
        assert "<title>" in page
        assert "app.js" in page
        with urllib.request.urlopen(f"{base}/app.js", timeout=10) as answer:
            assert b"function onStats" in answer.read()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
    finally:
        log.close()
