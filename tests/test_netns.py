"""Per-/64 IPv6 counting with real IPv6 sources, in a network namespace this test creates.

Loopback only has ::1, so the test makes a namespace of its own, gives its loopback device three
documentation-prefix addresses (two in one /64, one in another), and runs a server and its clients
inside. Nothing leaves the namespace.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, trio
from trio_echo import EchoServer, config_from_toml

async def main():
    config = config_from_toml(
        '[server]\nlisten = ["[2001:db8:1::1]:0"]\n[limits]\nmax_connections_per_ip = 1\n'
    )
    results = {}
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(EchoServer(config).run)
            port = int(server.addresses[0].rsplit(":", 1)[1])
            streams = []
            for source in ("2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::1"):
                stream = await trio.open_tcp_stream("2001:db8:1::1", port, local_address=source)
                streams.append(stream)
                await stream.send_all(b"ping")
                results[source] = (await stream.receive_some(10)).decode()
            results["refused"] = dict(server.stats.refused)
            results["per_source"] = dict(server.admission.per_source)
            for stream in streams:
                await stream.aclose()
            server.stop()
    print(json.dumps(results))

trio.run(main)
"""


ONLY_PURE = "per-/64 counting is then covered only by the pure tests"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespace() -> object:
    if sys.platform != "linux" or shutil.which("ip") is None:
        pytest.skip(f"NO NETWORK NAMESPACES: needs Linux and iproute2's ip; {ONLY_PURE}")
    name = f"trio-echo-test-{os.getpid()}"
    try:
        ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"NO NETWORK NAMESPACES here ({exc.stderr.decode().strip()}); {ONLY_PURE}")
    try:
        ip("-n", name, "link", "set", "lo", "up")
        for address in ("2001:db8:1::1/64", "2001:db8:1::2/64", "2001:db8:2::1/64"):
            ip("-n", name, "-6", "addr", "add", address, "dev", "lo", "nodad")
        yield name
    finally:
        ip("netns", "del", name)


def test_ipv6_sources_are_counted_per_64(namespace: str) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["2001:db8:1::1"] == "ping"
    assert outcome["2001:db8:1::2"] == ""  # same /64 as the first: refused (EOF)
    assert outcome["2001:db8:2::1"] == "ping"  # another /64: its own count
    assert outcome["refused"] == {"per_ip": 1}
    assert outcome["per_source"] == {"2001:db8:1::/64": 1, "2001:db8:2::/64": 1}
