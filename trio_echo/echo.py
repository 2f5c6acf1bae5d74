"""The echo session: what to read, what to send and when to finish (pure, sans-I/O).

The pump (``connection.py``) asks :meth:`EchoSession.next_step` what to do, does exactly that on its
stream, and reports back. The session never touches a socket, so every rule below is tested without an
event loop:

* the greeting (if any) goes out before anything is read;
* every byte received is echoed once, in order, and reading stops while any echo is unsent, so a
  connection never holds more than ``buffer_size`` bytes (backpressure instead of buffering);
* after the client's half-close (EOF) the remaining echo is finished, then the farewell (if any), then
  our own EOF; after that the session is done.

Chunks are held by reference (a ``memoryview`` of the ``bytes`` the stream returned, or of a buffer the
caller filled with ``recv_into``), never copied.
"""

from __future__ import annotations

import enum

_EMPTY = memoryview(b"")


class Step(enum.Enum):
    """What the pump must do next."""

    SEND = "send"  # send session.outgoing (at least one byte), then call sent(n)
    RECEIVE = "receive"  # receive at most session.receive_size bytes, then call received(data)
    SEND_EOF = "send_eof"  # half-close our side, then call sent_eof()
    DONE = "done"  # both directions finished; close the stream


class EchoSession:
    """State of one echo connection.

    Args:
        buffer_size: the most bytes read at once and held unsent (> 0).
        greeting: sent before the first read; ``b""`` for none.
        farewell: sent after the client's EOF, once the echo is complete; ``b""`` for none.
    """

    __slots__ = ("_outgoing", "_queue", "buffer_size", "bytes_in", "bytes_out", "eof_received", "eof_sent")

    def __init__(self, buffer_size: int, greeting: bytes = b"", farewell: bytes = b"") -> None:
        if buffer_size <= 0:
            raise ValueError("buffer_size must be > 0")
        self.buffer_size = buffer_size
        self.bytes_in = 0
        self.bytes_out = 0
        self.eof_received = False
        self.eof_sent = False
        # What is to be sent now (never more than one chunk) and, after EOF, the farewell.
        self._outgoing = memoryview(greeting) if greeting else _EMPTY  # (a memoryview is ~180 bytes)
        self._queue = farewell

    @property
    def outgoing(self) -> memoryview:
        """The bytes to send now (a view; valid until the next :meth:`sent`)."""
        return self._outgoing

    @property
    def receive_size(self) -> int:
        """How many bytes may be read now: ``buffer_size`` when nothing is unsent, else 0."""
        return 0 if self._outgoing or self.eof_received else self.buffer_size

    def next_step(self) -> Step:
        if self._outgoing:
            return Step.SEND
        if not self.eof_received:
            return Step.RECEIVE
        if self._queue:
            self._outgoing = memoryview(self._queue)
            self._queue = b""
            return Step.SEND
        return Step.DONE if self.eof_sent else Step.SEND_EOF

    def received(self, data: bytes | bytearray | memoryview) -> None:
        """Record a chunk read from the client (``b""`` = the client half-closed).

        Raises ``RuntimeError`` if reading was not allowed now or the chunk exceeds ``receive_size``:
        that is a pump bug, and the memory bound depends on it.
        """
        size = len(data)
        if self._outgoing or self.eof_received or size > self.buffer_size:  # (receive_size, inline)
            raise RuntimeError(f"received {size} bytes while {self.receive_size} were allowed")
        if size == 0:
            self.eof_received = True
            return
        self.bytes_in += size
        self._outgoing = data if isinstance(data, memoryview) else memoryview(data)

    def sent(self, count: int) -> None:
        """Record that the first ``count`` bytes of :attr:`outgoing` were sent."""
        if count < 0 or count > len(self._outgoing):
            raise RuntimeError(f"sent {count} bytes of {len(self._outgoing)} outgoing")
        self.bytes_out += count
        # The common case (all of it went) reuses one empty view instead of slicing a new one.
        self._outgoing = _EMPTY if count == len(self._outgoing) else self._outgoing[count:]

    def echoed(self, count: int) -> None:
        """Record that ``count`` bytes were received and sent back whole at once: the same as
        ``received`` of those bytes followed by ``sent(count)``, for the socket pump's steady state."""
        if self._outgoing or self.eof_received or not 0 < count <= self.buffer_size:
            raise RuntimeError(f"echoed {count} bytes while {self.receive_size} could be received")
        self.bytes_in += count
        self.bytes_out += count

    def sent_eof(self) -> None:
        """Record that our side is half-closed."""
        self.eof_sent = True

    def detach(self) -> None:
        """Copy the unsent bytes out of the caller's buffer, so the buffer can be reused (the socket
        pump reads into one buffer shared by every connection and calls this before it waits)."""
        if self._outgoing:
            self._outgoing = memoryview(bytes(self._outgoing))

    def take_unsent(self) -> memoryview:
        """Remove the unsent echo and return it, not counted as sent: another pump (the faulted one)
        takes it over and counts what it writes."""
        taken, self._outgoing = self._outgoing, _EMPTY
        return taken

    @property
    def unsent(self) -> int:
        """Bytes received (or queued to greet) and not yet sent."""
        return len(self._outgoing)
