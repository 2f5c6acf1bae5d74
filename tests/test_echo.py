import pytest

from trio_echo.echo import EchoSession, Step


def drive(session: EchoSession, chunks: list[bytes], *, send_limit: int | None = None) -> bytes:
    """Run a session to completion against a scripted client; return everything it sent."""
    out = bytearray()
    pending = [*chunks, b""]
    while (step := session.next_step()) is not Step.DONE:
        if step is Step.SEND:
            view = session.outgoing
            n = len(view) if send_limit is None else min(send_limit, len(view))
            out += view[:n]
            session.sent(n)
        elif step is Step.RECEIVE:
            chunk = pending.pop(0)
            assert len(chunk) <= session.receive_size
            session.received(chunk)
        elif step is Step.SEND_EOF:
            session.sent_eof()
    return bytes(out)


@pytest.mark.parametrize(
    ("greeting", "farewell", "chunks", "expected"),
    [
        (b"", b"", [], b""),
        (b"", b"", [b"abc", b"def"], b"abcdef"),
        (b"hi\n", b"", [b"x"], b"hi\nx"),
        (b"", b"bye\n", [b"ping"], b"pingbye\n"),
        (b"hello\n", b"bye\n", [b"a", b"b", b"c"], b"hello\nabcbye\n"),
        (b"", b"bye\n", [], b"bye\n"),
    ],
)
def test_echo_order_with_greeting_and_farewell(
    greeting: bytes, farewell: bytes, chunks: list[bytes], expected: bytes
) -> None:
    session = EchoSession(16, greeting, farewell)
    assert drive(session, chunks) == expected
    assert session.bytes_in == sum(map(len, chunks))
    assert session.bytes_out == len(expected)
    assert session.eof_received
    assert session.eof_sent


@pytest.mark.parametrize("send_limit", [1, 3, 7, 100])
def test_partial_sends_keep_order(send_limit: int) -> None:
    session = EchoSession(8, b"G", b"F")
    assert drive(session, [b"12345678", b"abc"], send_limit=send_limit) == b"G12345678abcF"


def test_reading_stops_while_echo_is_unsent() -> None:
    session = EchoSession(4)
    assert session.next_step() is Step.RECEIVE
    assert session.receive_size == 4
    session.received(b"abcd")
    assert session.receive_size == 0
    assert session.next_step() is Step.SEND
    session.sent(3)
    assert session.unsent == 1
    assert session.receive_size == 0  # still one byte unsent: no reading, so memory stays bounded
    assert session.next_step() is Step.SEND
    session.sent(1)
    assert session.next_step() is Step.RECEIVE
    assert session.receive_size == 4


def test_greeting_goes_before_any_read() -> None:
    session = EchoSession(4, b"hello")
    assert session.receive_size == 0
    assert session.next_step() is Step.SEND
    assert bytes(session.outgoing) == b"hello"


@pytest.mark.parametrize(
    ("setup", "action", "message"),
    [
        (lambda s: None, lambda s: s.received(b"12345"), "5 bytes while 4"),
        (lambda s: s.received(b"ab"), lambda s: s.received(b"c"), "1 bytes while 0"),
        (lambda s: s.received(b"ab"), lambda s: s.sent(3), "sent 3 bytes of 2"),
        (lambda s: None, lambda s: s.sent(-1), "sent -1"),
        (lambda s: None, lambda s: s.echoed(5), "echoed 5 bytes while 4"),
        (lambda s: None, lambda s: s.echoed(0), "echoed 0 bytes"),
        (lambda s: s.received(b"ab"), lambda s: s.echoed(1), "echoed 1 bytes while 0"),
        (lambda s: s.received(b""), lambda s: s.echoed(1), "echoed 1 bytes while 0"),
    ],
)
def test_pump_bugs_are_caught(setup, action, message) -> None:  # type: ignore[no-untyped-def]
    session = EchoSession(4)
    setup(session)
    with pytest.raises(RuntimeError, match=message):
        action(session)


def test_after_eof_nothing_more_is_read() -> None:
    session = EchoSession(4)
    session.received(b"")
    assert session.receive_size == 0
    assert session.next_step() is Step.SEND_EOF


def test_buffer_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="buffer_size"):
        EchoSession(0)


def test_memoryview_chunk_is_held_without_copy() -> None:
    buffer = bytearray(b"abcd")
    session = EchoSession(4)
    session.received(memoryview(buffer)[:3])
    assert bytes(session.outgoing) == b"abc"


def test_echoed_is_received_then_sent_whole() -> None:
    one, two = EchoSession(8, farewell=b"bye"), EchoSession(8, farewell=b"bye")
    one.received(b"abc")
    one.sent(3)
    two.echoed(3)
    assert (one.bytes_in, one.bytes_out, one.unsent) == (two.bytes_in, two.bytes_out, two.unsent) == (3, 3, 0)
    assert one.next_step() is two.next_step() is Step.RECEIVE
