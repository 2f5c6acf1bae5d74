"""The control link between a worker master and one worker process: JSON lines over a socketpair.

Each message is one JSON object on one line. The master's requests carry an ``id`` and get exactly one
reply carrying ``re`` (the same number); everything else flows one way: the worker's ``ready`` and
``trace`` messages, the master's ``wanted``, ``drain`` and ``abort``. The link is private to the two
processes (an inherited socketpair, never a listening socket), so a message that is not JSON means a
bug or a dying peer: :class:`ControlError`, and the master replaces the worker.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import trio

MAX_LINE = 256 * 1024 * 1024  # a ranking of every connection at 20,000 per worker is a few MB

Message = dict[str, object]


class ControlError(Exception):
    """The other end sent something that is not a control message, or a line past MAX_LINE."""


def encode(message: Mapping[str, object]) -> bytes:
    # json.dumps never emits a raw newline (it escapes them in strings), so a line is a message.
    # default=str: a trace field that is no JSON type travels as its text, as in the trace file.
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


def decode(line: bytes) -> Message:
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise ControlError(f"not a JSON control message: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError("a control message must be a JSON object")
    return message


class ControlLink:
    """One end of the link: ``send`` from any task (a lock keeps lines whole), ``receive`` from one."""

    def __init__(self, stream: trio.abc.Stream, *, max_line: int = MAX_LINE) -> None:
        self._stream = stream
        self._max_line = max_line
        self._buffer = bytearray()
        self._scanned = 0
        self._send_lock = trio.Lock()

    async def send(self, message: Mapping[str, object]) -> None:
        data = encode(message)
        async with self._send_lock:
            await self._stream.send_all(data)

    async def receive(self) -> Message | None:
        """The next message, or None once the other end has closed (or died)."""
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end > self._max_line or (end < 0 and len(self._buffer) > self._max_line):
                raise ControlError(f"a control message longer than {self._max_line} bytes")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                self._scanned = 0
                return decode(line)
            self._scanned = len(self._buffer)
            try:
                data = await self._stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                return None
            self._buffer += data

    async def aclose(self) -> None:
        await self._stream.aclose()


class Pending:
    """The master's side of request/reply: ``id`` numbers handed out, replies matched to waiters."""

    def __init__(self) -> None:
        self._next = 1
        self._waiting: dict[int, trio.MemorySendChannel[Message]] = {}

    def open(self) -> tuple[int, trio.MemoryReceiveChannel[Message]]:
        request_id = self._next
        self._next += 1
        send, receive = trio.open_memory_channel[Message](1)
        self._waiting[request_id] = send
        return request_id, receive

    def forget(self, request_id: int) -> None:
        self._waiting.pop(request_id, None)

    def deliver(self, reply: Message) -> bool:
        """Hand a reply to its waiter; False if nobody waits for it (it gave up already)."""
        request_id = reply.get("re")
        send = self._waiting.pop(request_id, None) if isinstance(request_id, int) else None
        if send is None:
            return False
        send.send_nowait(reply)
        return True

    def fail_all(self) -> None:
        """The link is gone: every waiter gets an end-of-channel instead of a reply."""
        for send in self._waiting.values():
            send.close()
        self._waiting.clear()
