"""Read buffers start on a page boundary (trio_echo/buffers.py says why: a bulk receive into a
buffer a few bytes past a page start runs at half speed)."""

from __future__ import annotations

import argparse
import ctypes
import mmap
import socket

import pytest
import trio

from tests.conftest import make_config
from trio_echo import benchloop
from trio_echo.addresses import parse_address
from trio_echo.buffers import page_aligned
from trio_echo.connection import Connection
from trio_echo.echo import EchoSession
from trio_echo.policy import ConnectionPolicy
from trio_echo.server import EchoServer


def offset_in_page(view: memoryview) -> int:
    return ctypes.addressof((ctypes.c_char * len(view)).from_buffer(view)) % mmap.PAGESIZE


@pytest.mark.parametrize("size", [1, 1024, 65536, 65543, 262144, 16 * 1024 * 1024])
def test_page_aligned_buffers_have_the_size_asked_and_start_on_a_page(size: int) -> None:
    view = page_aligned(size)
    assert (len(view), view.readonly, offset_in_page(view)) == (size, False, 0)
    view[size - 1] = 7  # writable to the last byte
    assert view[size - 1] == 7


async def test_the_servers_shared_read_buffer_starts_on_a_page() -> None:
    server = EchoServer(make_config(server={"listen": ["127.0.0.1:0"]}, limits={"buffer_size": 70000}))
    scratch = server.intake._scratch
    assert (len(scratch), offset_in_page(scratch)) == (70000, 0)


async def test_a_connections_own_read_buffer_starts_on_a_page() -> None:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    conn = Connection(ours, EchoSession(4096, b"", b""), ConnectionPolicy())  # no shared buffer
    with theirs, trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            theirs.sendall(b"x" * 100)
            await trio.lowlevel.wait_readable(theirs)
            assert theirs.recv(100) == b"x" * 100
            assert conn._buffer is not None  # (held while the connection is open)
            assert offset_in_page(conn._buffer) == 0
            theirs.shutdown(socket.SHUT_WR)


def test_the_load_generators_read_buffer_starts_on_a_page() -> None:
    opts = argparse.Namespace(mode="stream", size=65536, window=262144, count=None, duration=1.0)
    run = benchloop.FastRun(parse_address("127.0.0.1:9"), opts, 0, 0)
    assert (len(run._view), offset_in_page(run._view)) == (262144, 0)
