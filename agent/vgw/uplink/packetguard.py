"""A cap on the size of MQTT packets the agent reads, enforced on the byte stream before paho buffers anything.

MQTT 5 lets a client announce a Maximum Packet Size in CONNECT (MQTT 5.0 §3.1.2.11.4); a conforming broker
then discards larger messages instead of sending them. MQTT 3.1.1 has no such property, and paho reads a
whole packet into memory before handing it over (three 32 MB PUBLISH packets on the consent topic cost
about 200 MB), so the agent also filters what it reads from the TLS socket:

- the fixed header of every packet (MQTT 3.1.1 §2.2, MQTT 5.0 §2.1) is read first; a packet within the limit
  passes through untouched;
- an oversized PUBLISH keeps its topic and packet identifier but loses its payload (MQTT 5: and its
  properties): paho sees an empty message, acknowledges it (so the broker does not send it again) and the
  agent ignores it, as it ignores every empty consent message. Its payload is read and discarded in
  chunks, never held;
- any other oversized packet, or a malformed length, ends the connection (the uplink reconnects).

The filter hooks in through ``ssl.SSLContext.sslsocket_class`` (a documented extension point of the
standard library): the uplink's TLS context makes sockets whose ``recv`` passes through a
:class:`PacketSizeGuard`. No paho internals are touched; paho only calls ``recv`` and ``pending``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from vgw.base.errors import UplinkError

PUBLISH = 3
READ_CHUNK = 16 * 1024  # one TLS record at most


class PacketTooLarge(UplinkError, OSError):
    """A packet other than PUBLISH over the limit, or a malformed remaining length: the connection ends.

    Also an ``OSError``: paho treats it as a failed socket read and closes the connection."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class PacketSizeGuard:
    """Filters the bytes read from an MQTT broker (see the module docstring). Pure: bytes in, bytes out.

    ``on_drop(size)`` is called (in the reading thread) for each PUBLISH whose payload was dropped.
    """

    def __init__(self, limit: int, *, mqtt5: bool, on_drop: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.mqtt5 = mqtt5
        self.on_drop = on_drop
        self.dropped = 0
        self._header = bytearray()  # fixed header being read: type/flags byte and remaining length
        self._pass = 0  # bytes of the current packet still to pass through
        self._skip = 0  # bytes of an oversized packet still to discard
        self._keep: bytearray | None = None  # variable header of an oversized PUBLISH being read
        self._remaining = 0  # remaining length of that oversized PUBLISH
        self._size = 0

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if self._pass:
                take = min(self._pass, n - i)
                out += data[i:i + take]
                self._pass -= take
                i += take
            elif self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
            elif self._keep is not None:
                i = self._read_publish_header(data, i, out)
            else:
                self._header.append(data[i])
                i += 1
                self._header_byte(out)
        return bytes(out)

    def _header_byte(self, out: bytearray) -> None:
        header = self._header
        if len(header) < 2:
            return
        if header[-1] & 0x80:
            if len(header) >= 5:  # at most four length bytes (MQTT 3.1.1 §2.2.3, MQTT 5.0 §1.5.5)
                raise PacketTooLarge("MQTT packet with a malformed remaining length")
            return
        remaining = 0
        for k, byte in enumerate(header[1:]):
            remaining += (byte & 0x7F) << (7 * k)
        size = len(header) + remaining
        if size <= self.limit:
            out += header
            self._pass = remaining
            self._header = bytearray()
            return
        if header[0] >> 4 != PUBLISH:
            raise PacketTooLarge(f"MQTT packet of {size} bytes from the broker exceeds {self.limit}")
        self._keep = bytearray()
        self._remaining = remaining
        self._size = size

    def _read_publish_header(self, data: bytes, i: int, out: bytearray) -> int:
        """Collect an oversized PUBLISH's topic and packet id; then emit it without payload and skip the rest."""
        keep = self._keep
        assert keep is not None
        qos = (self._header[0] >> 1) & 0x03
        need = 2 if len(keep) < 2 else 2 + int.from_bytes(keep[:2], "big") + (2 if qos else 0)
        take = min(need - len(keep), len(data) - i)
        keep += data[i:i + take]
        i += take
        if len(keep) < 2:
            return i
        need = 2 + int.from_bytes(keep[:2], "big") + (2 if qos else 0)
        if need > self._remaining:
            raise PacketTooLarge("MQTT PUBLISH whose topic is longer than the packet")
        if len(keep) < need:
            return i
        body = bytes(keep) + (b"\x00" if self.mqtt5 else b"")  # MQTT 5: an empty property list
        out += bytes([self._header[0]]) + _varint(len(body)) + body
        self._skip = self._remaining - len(keep)
        self._keep = None
        self._header = bytearray()
        self.dropped += 1
        if self.on_drop is not None:
            self.on_drop(self._size)
        return i


class _GuardedSocket(ssl.SSLSocket):
    """A TLS socket whose ``recv`` passes the stream through a PacketSizeGuard (made by ``_make_guard``)."""

    _make_guard: Callable[[], PacketSizeGuard]
    _on_tls_error: Callable[[ssl.SSLError], None] | None
    _vgw_guard: PacketSizeGuard
    _vgw_out: bytearray

    def _guard_state(self) -> tuple[PacketSizeGuard, bytearray]:
        try:
            return self._vgw_guard, self._vgw_out
        except AttributeError:  # SSLSocket instances are built without __init__: set up on first use
            self._vgw_guard = type(self)._make_guard()
            self._vgw_out = bytearray()
            return self._vgw_guard, self._vgw_out

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        guard, out = self._guard_state()
        while not out:
            try:
                data = super().recv(READ_CHUNK, flags)  # one record at most; SSLWantReadError if none is there
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                # A TLS alert from the peer (TLS 1.3 sends a refused client certificate's alert after the
                # handshake, so it arrives here, not in connect): tell the owner which, then fail as before.
                hook = type(self)._on_tls_error
                if hook is not None:
                    hook(exc)
                raise
            if not data:
                return data  # end of stream
            out += guard.feed(data)
        chunk = bytes(out[:buflen])
        del out[:buflen]
        return chunk

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            hook = type(self)._on_tls_error
            if hook is not None:
                # The peer may have sent its alert and closed before this write (TLS 1.3: the broker checks our
                # certificate after the handshake): the alert waits in the read buffer; report it, not the EOF.
                hook(self._pending_alert() or exc)
            raise

    def _pending_alert(self) -> ssl.SSLError | None:
        try:
            ssl.SSLSocket.recv(self, 1)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return None
        except ssl.SSLError as exc:
            return exc
        except OSError:
            return None
        return None

    def pending(self) -> int:
        # Bytes already filtered but not yet read count as pending, so the reader does not wait in select().
        _, out = self._guard_state()
        return super().pending() + len(out)


def guard_context(ctx: ssl.SSLContext, limit: int, *, mqtt5: bool, on_drop: Callable[[int], None] | None = None,
                  on_tls_error: Callable[[ssl.SSLError], None] | None = None) -> ssl.SSLContext:
    """Make every socket ``ctx`` wraps filter inbound MQTT packets larger than ``limit`` bytes. Returns ``ctx``.

    ``on_tls_error(exc)`` is called (in the reading thread) with a TLS error a read raised, before it propagates.
    """

    def make() -> PacketSizeGuard:
        return PacketSizeGuard(limit, mqtt5=mqtt5, on_drop=on_drop)

    attrs: dict[str, Any] = {"_make_guard": staticmethod(make),
                             "_on_tls_error": staticmethod(on_tls_error) if on_tls_error is not None else None}
    ctx.sslsocket_class = type("GuardedSocket", (_GuardedSocket,), attrs)
    return ctx
