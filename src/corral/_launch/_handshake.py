"""Who may connect to a pool over the network: a mutual HMAC challenge on a raw socket.

Owns: the bytes of the handshake that opens every socket between a pool and a
remote worker, both ends of it (the pool's side async, the shim's side
blocking), and the tickets that say which peer is expected. Must not touch:
MessagePack, frames or anything after the handshake (``_socket_launcher`` and
``_transport`` take the socket over from here). Nothing the peer sends is
decoded before it has proved it holds the ticket's key: every field has a fixed
size, the one length field is checked before anything it announces is read,
and a peer that stalls is dropped at the deadline.

The exchange (all sizes fixed, ``||`` is concatenation)::

    peer -> pool  MAGIC || role || ticket_id  (the knock, sent on connect) 25 bytes
    pool -> peer  MAGIC || server_nonce        (sent on accept)            40 bytes
    peer -> pool  u16 length (= 81) || role || ticket_id || client_nonce
                  || HMAC-SHA256(key, "corral-peer" || server_nonce
                                      || client_nonce || role || ticket_id)  2 + 81
    pool -> peer  b"OK" || HMAC-SHA256(key, "corral-pool" || client_nonce
                                      || server_nonce || role || ticket_id)  34 bytes

The knock proves nothing (the MAC does): it only lets the listener see, the
moment it accepts a connection and before it gives it a handshake slot,
whether the peer names a launch in progress. Such a peer gets a slot reserved
for that launch, so strangers filling every other slot cannot keep a launched
worker out. A connection the pool closes before its greeting was refused for
load (``ListenerBusy``): the shim connects again, with backoff.

A ticket is made for one worker launch: a random public id, a random 32-byte
key, and one expected connection per role. Each role is accepted once (a
second connection with the same ticket and role is refused), and the ticket
expires at its deadline or when the launch is over, whichever comes first.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import secrets
import socket
import time
from dataclasses import dataclass, field

__all__ = [
    "CLIENT_HELLO_SIZE",
    "MAGIC",
    "KNOCK_SIZE",
    "HandshakeError",
    "ListenerBusy",
    "Role",
    "Ticket",
    "TicketBook",
    "client_handshake",
    "knock",
    "read_knock",
    "server_handshake",
]

MAGIC = b"CORRAL\x00\x02"  # protocol name and handshake version
NONCE_SIZE = 32
TICKET_ID_SIZE = 16
KEY_SIZE = 32
MAC_SIZE = 32
# role (1) + ticket id + client nonce + MAC
CLIENT_HELLO_SIZE = 1 + TICKET_ID_SIZE + NONCE_SIZE + MAC_SIZE
KNOCK_SIZE = len(MAGIC) + 1 + TICKET_ID_SIZE  # MAGIC || role || ticket id
_LENGTH_SIZE = 2
_OK = b"OK"


class Role(enum.IntEnum):
    """What a connection is for; each ticket admits one connection per role."""

    DATA = 1  # calls and replies: the worker's protocol socket
    CONTROL = 2  # Ping and Cancel, read by the worker's control thread
    SUPERVISION = 3  # the shim: stderr, exit status, signals; its EOF is the lifeline


class HandshakeError(Exception):
    """The peer is not who it must be, or did not say so in time and in form."""


class ListenerBusy(HandshakeError):
    """The pool closed the connection before greeting it: its listener is at its limit.

    Not a refusal of the ticket (that comes after the hello): connect again.
    """


def knock(role: Role, ticket_id: bytes) -> bytes:
    """The first bytes a peer sends, at once on connecting: which launch it is for."""
    return MAGIC + bytes((role,)) + ticket_id


def read_knock(data: bytes) -> tuple[bytes, int] | None:
    """(ticket id, role) from a knock; None if ``data`` is not one."""
    if len(data) != KNOCK_SIZE or not data.startswith(MAGIC):
        return None
    return data[len(MAGIC) + 1 :], data[len(MAGIC)]


def _mac(
    key: bytes, label: bytes, first: bytes, second: bytes, role: int, ticket_id: bytes
) -> bytes:
    message = b"".join((label, first, second, bytes((role,)), ticket_id))
    return hmac.new(key, message, hashlib.sha256).digest()


@dataclass
class Ticket:
    """The credentials of one worker launch, and the sockets that presented them."""

    id: bytes
    key: bytes
    expires_at: float  # time.monotonic()
    accepted: dict[Role, asyncio.Future[socket.socket]] = field(default_factory=dict)

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at


class TicketBook:
    """The tickets a listener currently honours."""

    def __init__(self) -> None:
        self._tickets: dict[bytes, Ticket] = {}

    def issue(self, lifetime: float, roles: tuple[Role, ...] = tuple(Role)) -> Ticket:
        """A fresh ticket expecting one connection per role, valid for ``lifetime`` seconds."""
        loop = asyncio.get_running_loop()
        ticket = Ticket(
            id=secrets.token_bytes(TICKET_ID_SIZE),
            key=secrets.token_bytes(KEY_SIZE),
            expires_at=time.monotonic() + lifetime,
            accepted={role: loop.create_future() for role in roles},
        )
        self._tickets[ticket.id] = ticket
        return ticket

    def revoke(self, ticket: Ticket) -> None:
        """Honour the ticket no more; roles that have not connected never will."""
        self._tickets.pop(ticket.id, None)
        for future in ticket.accepted.values():
            if not future.done():
                future.cancel()

    def lookup(self, ticket_id: bytes, role: int) -> Ticket | None:
        """The live ticket expecting ``role`` under that id, or None."""
        ticket = self._tickets.get(ticket_id)
        if ticket is None or ticket.expired:
            return None
        try:
            future = ticket.accepted[Role(role)]
        except (ValueError, KeyError):
            return None
        if future.done():
            return None  # that role already connected: single use
        return ticket

    def __len__(self) -> int:
        return len(self._tickets)

    def expecting(self) -> int:
        """How many connections the live tickets still wait for (one per role each)."""
        return sum(
            1
            for ticket in self._tickets.values()
            if not ticket.expired
            for future in ticket.accepted.values()
            if not future.done()
        )


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        count = await loop.sock_recv_into(sock, view[got:])
        if count == 0:
            raise HandshakeError(f"peer closed the connection after {got} of {n} bytes")
        got += count
    return bytes(buffer)


async def server_handshake(
    sock: socket.socket, book: TicketBook, timeout: float
) -> tuple[Ticket, Role]:
    """Authenticate a freshly accepted peer; raises HandshakeError (or TimeoutError).

    On success the socket belongs to the ticket's future for that role (set by
    the caller); on failure the caller closes it. Reads at most
    ``2 + CLIENT_HELLO_SIZE`` bytes whatever the peer sends.
    """
    loop = asyncio.get_running_loop()
    server_nonce = secrets.token_bytes(NONCE_SIZE)
    async with asyncio.timeout(timeout):
        await loop.sock_sendall(sock, MAGIC + server_nonce)
        # The magic alone first: a peer that speaks anything else is refused on it.
        magic = await _recv_exactly(loop, sock, len(MAGIC))
        if magic != MAGIC:
            raise HandshakeError("the peer did not knock as a corral shim")
        knocked = read_knock(magic + await _recv_exactly(loop, sock, KNOCK_SIZE - len(MAGIC)))
        assert knocked is not None
        length = int.from_bytes(await _recv_exactly(loop, sock, _LENGTH_SIZE), "big")
        if length != CLIENT_HELLO_SIZE:
            raise HandshakeError(
                f"first frame announces {length} bytes, the handshake is {CLIENT_HELLO_SIZE}"
            )
        hello = await _recv_exactly(loop, sock, CLIENT_HELLO_SIZE)
        role = hello[0]
        ticket_id = hello[1 : 1 + TICKET_ID_SIZE]
        client_nonce = hello[1 + TICKET_ID_SIZE : 1 + TICKET_ID_SIZE + NONCE_SIZE]
        their_mac = hello[1 + TICKET_ID_SIZE + NONCE_SIZE :]
        if knocked != (ticket_id, role):
            raise HandshakeError("the hello names another ticket or role than the knock")
        ticket = book.lookup(ticket_id, role)
        # Compare against a MAC even for an unknown ticket, so the time taken
        # does not tell which ticket ids exist.
        key = ticket.key if ticket is not None else secrets.token_bytes(KEY_SIZE)
        expected = _mac(key, b"corral-peer", server_nonce, client_nonce, role, ticket_id)
        if not hmac.compare_digest(expected, their_mac) or ticket is None:
            raise HandshakeError("unknown, used or expired ticket, or wrong key")
        proof = _mac(key, b"corral-pool", client_nonce, server_nonce, role, ticket_id)
        await loop.sock_sendall(sock, _OK + proof)
    return ticket, Role(role)


def _recv_exactly_blocking(sock: socket.socket, n: int) -> bytes:
    buffer = bytearray(n)
    view = memoryview(buffer)
    got = 0
    while got < n:
        count = sock.recv_into(view[got:])
        if count == 0:
            raise HandshakeError(f"pool closed the connection after {got} of {n} bytes")
        got += count
    return bytes(buffer)


def client_handshake(sock: socket.socket, ticket_id: bytes, key: bytes, role: Role) -> None:
    """The shim's side, on a connected blocking socket (with a timeout set).

    Raises HandshakeError if the pool refuses us or cannot prove it holds the key,
    and ListenerBusy if it closed the connection before greeting us (try again).
    """
    try:
        sock.sendall(knock(role, ticket_id))
        greeting = _recv_exactly_blocking(sock, len(MAGIC) + NONCE_SIZE)
    except (HandshakeError, ConnectionResetError, BrokenPipeError) as exc:
        raise ListenerBusy(f"the pool closed the connection before greeting it ({exc})") from exc
    if greeting[: len(MAGIC)] != MAGIC:
        raise HandshakeError("the peer is not a corral pool (or speaks another version)")
    server_nonce = greeting[len(MAGIC) :]
    client_nonce = secrets.token_bytes(NONCE_SIZE)
    mac = _mac(key, b"corral-peer", server_nonce, client_nonce, role, ticket_id)
    hello = bytes((role,)) + ticket_id + client_nonce + mac
    sock.sendall(len(hello).to_bytes(_LENGTH_SIZE, "big") + hello)
    try:
        answer = _recv_exactly_blocking(sock, len(_OK) + MAC_SIZE)
    except HandshakeError:
        raise HandshakeError("the pool refused the ticket") from None
    expected = _mac(key, b"corral-pool", client_nonce, server_nonce, role, ticket_id)
    if answer[: len(_OK)] != _OK or not hmac.compare_digest(answer[len(_OK) :], expected):
        raise HandshakeError("the pool could not prove it holds the ticket's key")
