"""Who gets past the pool's listener: only a peer that proves it holds a live ticket's key.

Everything a peer sends before that is fixed-size bytes checked by length and
HMAC; nothing is decoded, and a rejected peer's socket is never handed to a
launch.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral._framing import FrameEncoder
from corral._launch._handshake import (
    CLIENT_HELLO_SIZE,
    MAGIC,
    HandshakeError,
    ListenerBusy,
    Role,
    Ticket,
    client_handshake,
)
from corral._launch._socket_launcher import Listener
from corral._messages import Call

GREETING_SIZE = len(MAGIC) + 32


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    listener = Listener("127.0.0.1", handshake_timeout=0.5)
    listener.open()
    try:
        yield listener
    finally:
        listener.close()
        await asyncio.sleep(0)  # let the abandoned handshakes close their sockets


def _connect(listener: Listener) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
    return sock


def _present(listener: Listener, ticket_id: bytes, key: bytes, role: Role) -> socket.socket:
    """The shim's side, in a thread: connect and authenticate (raises on refusal)."""
    sock = _connect(listener)
    try:
        client_handshake(sock, ticket_id, key, role)
    except BaseException:
        sock.close()
        raise
    return sock


async def _greeting(sock: socket.socket) -> bytes:
    """The pool's first bytes (read in a thread: the pool runs on this loop)."""
    return await asyncio.to_thread(sock.recv, GREETING_SIZE)


async def _closed_by_pool(sock: socket.socket) -> bytes:
    """Everything the pool sends until it closes the connection."""

    def read_all() -> bytes:
        chunks = []
        try:
            while data := sock.recv(4096):
                chunks.append(data)
        except ConnectionResetError:
            pass  # closed with our bytes unread: the kernel says so with a reset
        return b"".join(chunks)

    try:
        return await asyncio.to_thread(read_all)
    finally:
        sock.close()


async def _rejections(listener: Listener, count: int) -> None:
    await asyncio.wait_for(listener.wait_rejected(count), 10)


def _nothing_handed_over(ticket: Ticket) -> bool:
    return not any(future.done() for future in ticket.accepted.values())


async def test_a_peer_with_the_tickets_key_is_admitted_once_per_role(listener: Listener) -> None:
    ticket = listener.tickets.issue(30)
    sock = await asyncio.to_thread(_present, listener, ticket.id, ticket.key, Role.DATA)
    try:
        admitted = await asyncio.wait_for(ticket.accepted[Role.DATA], 5)
        # The pool's end of that same connection was handed over, nothing else.
        assert admitted.getpeername() == sock.getsockname()
        assert not ticket.accepted[Role.CONTROL].done()
        assert listener.rejected == 0
        admitted.close()
    finally:
        sock.close()


async def test_the_same_ticket_and_role_is_refused_the_second_time(listener: Listener) -> None:
    ticket = listener.tickets.issue(30)
    first = await asyncio.to_thread(_present, listener, ticket.id, ticket.key, Role.CONTROL)
    first.close()
    (await ticket.accepted[Role.CONTROL]).close()
    with pytest.raises(HandshakeError, match="refused"):
        await asyncio.to_thread(_present, listener, ticket.id, ticket.key, Role.CONTROL)
    await _rejections(listener, 1)


async def test_a_wrong_key_is_refused_and_nothing_is_handed_over(listener: Listener) -> None:
    ticket = listener.tickets.issue(30)
    with pytest.raises(HandshakeError, match="refused"):
        await asyncio.to_thread(_present, listener, ticket.id, b"\x00" * 32, Role.DATA)
    await _rejections(listener, 1)
    assert _nothing_handed_over(ticket)


async def test_an_unknown_ticket_is_refused(listener: Listener) -> None:
    ticket = listener.tickets.issue(30)
    with pytest.raises(HandshakeError, match="refused"):
        await asyncio.to_thread(_present, listener, b"\x01" * 16, ticket.key, Role.DATA)
    assert _nothing_handed_over(ticket)


async def test_an_expired_or_revoked_ticket_is_refused(listener: Listener) -> None:
    expired = listener.tickets.issue(0)
    with pytest.raises(HandshakeError, match="refused"):
        await asyncio.to_thread(_present, listener, expired.id, expired.key, Role.DATA)
    revoked = listener.tickets.issue(30)
    listener.tickets.revoke(revoked)
    with pytest.raises(HandshakeError, match="refused"):
        await asyncio.to_thread(_present, listener, revoked.id, revoked.key, Role.DATA)
    assert listener.rejected == 2


async def test_a_peer_that_sends_nothing_is_dropped_at_the_deadline(listener: Listener) -> None:
    ticket = listener.tickets.issue(30)
    sock = _connect(listener)
    started = time.monotonic()
    received = await _closed_by_pool(sock)
    # The greeting, then nothing until the pool hangs up at handshake_timeout.
    assert len(received) == GREETING_SIZE and received.startswith(MAGIC)
    assert time.monotonic() - started >= listener.handshake_timeout * 0.9
    await _rejections(listener, 1)
    assert _nothing_handed_over(ticket)


async def test_a_slow_peer_is_dropped_at_the_deadline_even_while_it_sends(
    listener: Listener,
) -> None:
    ticket = listener.tickets.issue(30)
    sock = _connect(listener)

    def trickle() -> None:
        sock.recv(GREETING_SIZE)
        try:
            # A byte at a time: each arrives well inside any read timeout, but
            # the whole handshake would take far longer than its deadline.
            sock.sendall(CLIENT_HELLO_SIZE.to_bytes(2, "big"))
            for _ in range(CLIENT_HELLO_SIZE):
                sock.sendall(b"\x00")
                time.sleep(listener.handshake_timeout / 10)
        except OSError:
            return  # the pool hung up on us

    try:
        await asyncio.to_thread(trickle)
        await _rejections(listener, 1)
    finally:
        sock.close()
    assert _nothing_handed_over(ticket)


async def test_an_oversize_first_frame_is_refused_before_its_body_is_read(
    listener: Listener,
) -> None:
    ticket = listener.tickets.issue(30)
    sock = _connect(listener)
    await _greeting(sock)
    # A protocol frame straight away, as a peer that skips the handshake would
    # send: its first two bytes read as a length that is not the handshake's.
    frame = FrameEncoder().encode(Call(1, "add", (1, 2), {}))
    sock.sendall(b"\xff\xff" + bytes(frame))
    started = time.monotonic()
    assert await _closed_by_pool(sock) == b""
    # Refused on the length alone, not at the deadline.
    assert time.monotonic() - started < listener.handshake_timeout
    await _rejections(listener, 1)
    assert _nothing_handed_over(ticket)


async def test_a_pool_that_cannot_prove_the_key_is_not_trusted_by_the_shim() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def impostor() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(MAGIC + b"\x00" * 32)
            conn.recv(2 + CLIENT_HELLO_SIZE)
            conn.sendall(b"OK" + b"\x00" * 32)

    serving = asyncio.ensure_future(asyncio.to_thread(impostor))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            pytest.raises(HandshakeError, match="could not prove"),
        ):
            await asyncio.to_thread(client_handshake, sock, b"\x02" * 16, b"k" * 32, Role.DATA)
        await serving
    finally:
        server.close()


async def test_handshakes_beyond_the_limit_are_closed_at_once() -> None:
    listener = Listener("127.0.0.1", handshake_timeout=5.0, max_pending=1)
    listener.open()
    first = _connect(listener)
    second = _connect(listener)
    try:
        await _greeting(first)  # the first is being served
        assert await _closed_by_pool(second) == b""
        assert listener.rejected == 1
    finally:
        first.close()
        second.close()
        listener.close()
        await asyncio.sleep(0)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(junk=st.binary(min_size=0, max_size=2 + CLIENT_HELLO_SIZE + 16))
def test_arbitrary_bytes_never_get_a_peer_admitted(junk: bytes) -> None:
    async def scenario() -> None:
        listener = Listener("127.0.0.1", handshake_timeout=0.2)
        listener.open()
        try:
            ticket = listener.tickets.issue(30)
            sock = _connect(listener)
            await _greeting(sock)
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            await _closed_by_pool(sock)
            await _rejections(listener, 1)
            assert _nothing_handed_over(ticket)
        finally:
            listener.close()
            await asyncio.sleep(0)

    asyncio.run(scenario())


async def test_a_launch_gets_in_while_strangers_hold_every_shared_slot() -> None:
    listener = Listener("127.0.0.1", handshake_timeout=5.0, max_pending=2)
    listener.open()
    strangers = [_connect(listener) for _ in range(2)]
    try:
        for stranger in strangers:
            await _greeting(stranger)  # both shared slots are taken, and stay so
        turned_away = _connect(listener)
        assert await _closed_by_pool(turned_away) == b""
        assert listener.busy == 1
        ticket = listener.tickets.issue(30)
        sock = await asyncio.to_thread(_present, listener, ticket.id, ticket.key, Role.DATA)
        try:
            (await asyncio.wait_for(ticket.accepted[Role.DATA], 5)).close()
        finally:
            sock.close()
        assert listener.busy == 1
    finally:
        for stranger in strangers:
            stranger.close()
        listener.close()
        await asyncio.sleep(0)


async def test_a_closed_door_before_the_greeting_tells_the_shim_to_try_again() -> None:
    listener = Listener("127.0.0.1", handshake_timeout=5.0, max_pending=1)
    listener.open()
    stranger = _connect(listener)
    try:
        await _greeting(stranger)
        ticket = listener.tickets.issue(30)
        listener.tickets.revoke(ticket)  # no launch waits for it: no reserved slot
        with pytest.raises(ListenerBusy):
            await asyncio.to_thread(_present, listener, ticket.id, ticket.key, Role.DATA)
    finally:
        stranger.close()
        listener.close()
        await asyncio.sleep(0)
