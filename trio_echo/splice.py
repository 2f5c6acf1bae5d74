"""The relay's splice pipe: a stream's bytes go socket -> pipe -> socket inside the kernel (I/O helper).

Why: echoing a chunk with ``recv_into`` and ``send`` copies it twice, from the kernel into our buffer
and back; ``splice(2)`` moves references to the pages that hold it into a pipe and from the pipe onto
the socket instead. The relay splices only once a read has come back full (the client is streaming);
one read per message exchange stays a plain copy, cheaper for small messages. Measured with ten
connections streaming 64 KiB writes (docs/performance.md, "Splicing the stream"): about 11 % less
server CPU per GB.

One pipe serves every connection of an event loop, so it must be empty between two chunks, always:
whatever a short send leaves in it is taken out at once (:meth:`SplicePipe.take`) and becomes the
session's unsent echo, at most one read's worth, so the ``buffer_size`` bound holds as with a copy.

Linux only (``os.splice``); where the kernel refuses to splice a socket the relay copies instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

# What splice(2) says when it cannot splice this kind of file, or is not allowed to (a seccomp
# filter): never an error of the connection itself, so the relay copies instead.
REFUSALS = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM})
FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
PIPE_SIZE = 1 << 20  # the kernel's pipe-max-size for unprivileged processes by default


class SplicePipe:
    """A non-blocking pipe the relay's connections splice through, one chunk at a time."""

    __slots__ = ("read_fd", "usable", "write_fd")

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.usable = True  # False once the kernel has refused a splice: copy from then on

    @classmethod
    def open(cls, size: int = PIPE_SIZE) -> SplicePipe | None:
        """A pipe of up to ``size`` bytes (the default 64 KiB when the kernel will not grow it:
        splices are then shorter, never wrong), or None where there is no ``splice``."""
        if not hasattr(os, "splice"):  # pragma: no cover - not Linux
            return None
        read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # over the user's pipe quota, or above pipe-max-size
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, size)
        return cls(read_fd, write_fd)

    def take(self, count: int) -> bytes:
        """Read the ``count`` bytes a short splice out of the pipe left in it (the pipe is empty
        after)."""
        data = os.read(self.read_fd, count)
        # A pipe read goes on through the pipe's buffers until it has all it asked for or the pipe is
        # empty: one read takes it all. Were it ever not so, this connection fails (its task reports
        # the error) and the relay replaces the pipe, rather than leave bytes for another connection.
        if len(data) != count:
            raise RuntimeError(f"took {len(data)} of the {count} bytes left in the splice pipe")
        return data

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)
