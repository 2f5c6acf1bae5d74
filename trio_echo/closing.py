"""Ending connections politely: the lingering close and the refusal (I/O).

Closing a socket with unread input makes the kernel send RST, which can destroy data the peer has not
read yet (our echo, a refusal text); draining first lets our FIN arrive behind the data.
"""

from __future__ import annotations

import trio

LINGER_CHUNK = 16384  # read size while discarding input during a lingering close


async def close_gracefully(
    stream: trio.abc.Stream, *, linger_timeout: float, shut_write: bool = True
) -> None:
    """Lingering close: shut our write side, read and discard until EOF or ``linger_timeout``, close.

    ``linger_timeout`` 0 closes at once. The stream is closed on every path, even when cancelled.
    """
    try:
        if linger_timeout:
            with trio.move_on_after(linger_timeout):
                if shut_write and isinstance(stream, trio.abc.HalfCloseableStream):
                    await stream.send_eof()
                while await stream.receive_some(LINGER_CHUNK):
                    pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
        pass  # the peer is gone or the stream is unusable: closing is all that is left
    finally:
        # aclose closes the resource even when cancelled (a hard stop), just less politely.
        with trio.move_on_after(linger_timeout):
            await stream.aclose()


async def refuse(stream: trio.abc.Stream, text: bytes, *, patience: float) -> None:
    """Send ``text`` (may be empty) to a refused client, then close it gracefully, all within about
    ``2 * patience`` seconds."""
    try:
        if text:
            with trio.move_on_after(patience):
                await stream.send_all(text)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    await close_gracefully(stream, linger_timeout=patience)
