"""The pytest plugin, exercised the way a user's suite would use it (pytester runs a sub-pytest)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

USER_TESTS = """
import pytest
import trio


async def test_real_port(echo_server):
    stream = await trio.open_tcp_stream(echo_server.host, echo_server.port)
    async with stream:
        await stream.send_all(b"ping")
        assert await stream.receive_some(10) == b"ping"
    assert echo_server.host == "127.0.0.1"
    assert echo_server.address == f"127.0.0.1:{echo_server.port}"
    assert echo_server.stats.total == 1


@pytest.mark.echo_server(server={"greeting": "hi\\n", "farewell": "bye\\n"})
async def test_marker_config(echo_server):
    stream = await trio.open_tcp_stream(echo_server.host, echo_server.port)
    async with stream:
        await stream.send_all(b"x")
        await stream.send_eof()
        data = b""
        while chunk := await stream.receive_some(100):
            data += chunk
    assert data == b"hi\\nxbye\\n"


@pytest.mark.parametrize("echo_server", [{"limits": {"max_connections": 1}}], indirect=True)
async def test_indirect_parametrization(echo_server):
    assert echo_server.server.max_connections == 1


async def test_in_memory(echo_stream):
    await echo_stream.send_all(b"ping")
    assert await echo_stream.receive_some(10) == b"ping"


@pytest.mark.echo_server(limits={"idle_timeout": 5})
async def test_in_memory_with_mock_clock(echo_stream, autojump_clock):
    await echo_stream.send_all(b"ping")
    assert await echo_stream.receive_some(10) == b"ping"
    assert await echo_stream.receive_some(10) == b""  # closed for idleness after 5 s
    assert trio.current_time() == 5
"""


def test_fixtures_work_in_a_user_suite(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(test_user=USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)


def test_the_examples_in_docs_testing_md_pass(pytester: pytest.Pytester) -> None:
    text = (Path(__file__).parent.parent / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 4
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    for index, block in enumerate(blocks):
        pytester.makepyfile(**{f"test_doc_{index}": block})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=sum(block.count("\nasync def test_") for block in blocks))


def test_faults_break_a_client_that_does_not_retry(pytester: pytest.Pytester) -> None:
    """The docs' fault example can fail: a client that does not retry is caught out."""
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_naive="""
import pytest
import trio

@pytest.mark.echo_server(faults={"reset_after_bytes": 5})
async def test_naive(echo_server):
    async with await trio.open_tcp_stream(echo_server.host, echo_server.port) as stream:
        await stream.send_all(b"hello, world")
        received = b""
        while len(received) < 12:
            received += await stream.receive_some(100)
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*BrokenResourceError*"])


def test_bad_fixture_config_is_a_clear_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        test_bad="""
import pytest

@pytest.mark.echo_server(limits={"idle_timeout": -1})
async def test_bad(echo_server):
    pass
"""
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)  # pytest-trio runs async fixtures inside the test's call
    result.stdout.fnmatch_lines(["*ConfigError: limits.idle_timeout = -1.0: must be >= 0*"])


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.echo_server(**sections)*"])
