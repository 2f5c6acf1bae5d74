"""The relay's splice pipe (splice.py); the splicing itself is tested through the relay
(test_relay.py)."""

from __future__ import annotations

import fcntl
import os

import pytest

from trio_echo.splice import PIPE_SIZE, SplicePipe


def test_the_pipe_is_non_blocking_and_as_large_as_the_kernel_allows() -> None:
    pipe = SplicePipe.open()
    assert pipe is not None
    try:
        with pytest.raises(BlockingIOError):
            os.read(pipe.read_fd, 1)
        assert fcntl.fcntl(pipe.write_fd, fcntl.F_GETPIPE_SZ) in (PIPE_SIZE, 1 << 16)
        assert pipe.usable
    finally:
        pipe.close()


def test_take_empties_the_pipe_or_says_it_could_not() -> None:
    pipe = SplicePipe.open()
    assert pipe is not None
    try:
        os.write(pipe.write_fd, b"left")
        os.write(pipe.write_fd, b" over")  # two writes: two of the pipe's buffers, one read
        assert pipe.take(9) == b"left over"
        os.write(pipe.write_fd, b"abc")
        with pytest.raises(RuntimeError, match="took 3 of the 5 bytes"):
            pipe.take(5)
    finally:
        pipe.close()
