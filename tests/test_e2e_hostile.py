"""Hostile peers on raw sockets: bad heads, bad frames, stalled handshakes and closes.

After each, another browser on the same server still receives a published message: one
peer's misbehaviour never costs anyone else their connection.
"""

import struct
from typing import List, NamedTuple

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.support import (ServerFixture, post, raw_connect, registered_browser,
                           status_of, token, wait_until, ws_handshake)

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE = 0x0, 0x1, 0x2, 0x8
# A guard for awaits that hang forever when a protection is missing; never reached
# when the server behaves, so no assertion depends on it.
HANG_GUARD = 10


def client_frame(opcode: int, payload: bytes = b"", fin: bool = True,
                 mask: bytes = b"\x37\xfa\x21\x3d") -> bytes:
    """A masked client frame with any opcode, FIN bit and payload."""
    size = len(payload)
    if size <= 125:
        length = bytes([0x80 | size])
    elif size <= 0xFFFF:
        length = bytes([0x80 | 126]) + struct.pack(">H", size)
    else:
        length = bytes([0x80 | 127]) + struct.pack(">Q", size)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode]) + length + mask + masked


def close_payload(code: int, reason: bytes = b"") -> bytes:
    """The payload of a close frame."""
    return struct.pack(">H", code) + reason


class Frame(NamedTuple):
    """One frame as the server sent it."""

    fin: bool
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int:
        return struct.unpack(">H", self.payload[:2])[0]


def server_frames(data: bytes) -> List[Frame]:
    """The complete frames in the bytes a server sent after its 101 head."""
    data = data.partition(b"\r\n\r\n")[2]
    frames, at = [], 0
    while len(data) - at >= 2:
        first, second = data[at], data[at + 1]
        size, at_payload = second & 0x7F, at + 2
        if size == 126:
            size, at_payload = struct.unpack(">H", data[at + 2:at + 4])[0], at + 4
        elif size == 127:
            size, at_payload = struct.unpack(">Q", data[at + 2:at + 10])[0], at + 10
        if len(data) < at_payload + size:
            break
        frames.append(Frame(bool(first & 0x80), first & 0x0F, data[at_payload:at_payload + size]))
        at = at_payload + size
    return frames


def close_frame(client):
    """The server's close frame received by a raw client, or None."""
    return next((frame for frame in server_frames(client.data) if frame.opcode == OP_CLOSE), None)


def guarded(awaitable):
    """`awaitable` as a Deferred that fails the test instead of hanging when it never fires."""
    return defer.ensureDeferred(awaitable).addTimeout(HANG_GUARD, reactor)


async def raw_socket(testcase, port: int):
    """A raw TCP client, aborted (and its close awaited) on cleanup."""
    client = await raw_connect(port)

    def abort():
        if client.done.called:
            return None
        client.transport.abortConnection()
        return client.done
    testcase.addCleanup(abort)
    return client


async def exchange(testcase, port: int, data: bytes) -> bytes:
    """Write `data` on a fresh raw socket; all bytes received until the server closes."""
    client = await raw_socket(testcase, port)
    client.transport.write(data)
    await guarded(client.done)
    return client.data


async def raw_browser(testcase, server: ServerFixture, query: str = None, headers=None):
    """A browser on a raw socket, past its 101 handshake; frames are written by hand."""
    client = await raw_socket(testcase, server.public_port)
    query = f"?token={token()}" if query is None else query
    client.transport.write(ws_handshake(server.public_path + query, server.public_port, headers))
    head = await guarded(client.head)
    testcase.assertEqual(status_of(head), 101, head)
    return client


async def assert_others_served(testcase, server: ServerFixture, bystander):
    """`bystander` (open before the trouble) and a browser connecting now both receive a
    message published now."""
    fresh = await registered_browser(testcase, server, None)
    fresh.say("register:1")
    await wait_until(lambda: server.service.broker.registered_counts().get("1") == 2)
    status, _ = await post(testcase, server.private_url, {"REPO_ID": "1", "CONTENT": "still-serving"})
    testcase.assertEqual(status, 200)
    for browser in (bystander, fresh):
        testcase.assertEqual(await guarded(browser.next_message()), b"still-serving")


class BadRequestHeadTests(unittest.TestCase):
    """What arrives before any WebSocket frame: garbage, a stalled head, a huge head."""

    timeout = HANG_GUARD * 3

    async def test_garbage_instead_of_request_is_400_and_closed(self):
        """Bytes that are no HTTP request get a 400 answer and the connection is closed."""
        server = ServerFixture.start(self)
        bystander = await registered_browser(self, server, "1")
        for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
                        b"HELLO\r\n\r\n", b"GET / SPDY/3\r\nHost: x\r\n\r\n",
                        b"GET /public HTTP/1.1\r\nno colon here\r\n\r\n"):
            answer = await exchange(self, server.public_port, garbage)
            self.assertEqual(status_of(answer), 400, garbage)
        await assert_others_served(self, server, bystander)

    async def test_half_sent_handshake_is_dropped_after_handshake_timeout(self):
        """A head without its final CRLF CRLF is dropped, unanswered, after handshake_timeout."""
        server = ServerFixture.start(self, limits_handshake_timeout="0.2")
        bystander = await registered_browser(self, server, "1")
        client = await raw_socket(self, server.public_port)
        client.transport.write(ws_handshake(f"/public?token={token()}", server.public_port)[:-2])
        await guarded(client.done)
        self.assertEqual(client.data, b"")
        await assert_others_served(self, server, bystander)

    async def test_dribbled_handshake_does_not_extend_the_deadline(self):
        """A head sent a byte at a time, never ending, is still dropped at handshake_timeout."""
        server = ServerFixture.start(self, limits_handshake_timeout="0.2")
        bystander = await registered_browser(self, server, "1")
        client = await raw_socket(self, server.public_port)
        client.transport.write(f"GET /public?token={token()} HTTP/1.1\r\nX-Slow: ".encode())

        def dribble():
            if not client.done.called:
                client.transport.write(b"s")
            return client.done.called
        await wait_until(dribble)
        self.assertEqual(client.data, b"")
        await assert_others_served(self, server, bystander)

    async def test_oversized_head_is_431(self):
        """A request head over 16 KiB is answered 431 and closed, complete or not."""
        server = ServerFixture.start(self)
        bystander = await registered_browser(self, server, "1")
        big = {"X-Padding": "p" * (17 * 1024)}
        complete = ws_handshake(f"/public?token={token()}", server.public_port, big)
        answer = await exchange(self, server.public_port, complete)
        self.assertEqual(status_of(answer), 431)
        endless = complete[:-4]
        answer = await exchange(self, server.public_port, endless)
        self.assertEqual(status_of(answer), 431)
        await assert_others_served(self, server, bystander)

    async def test_head_just_under_the_limit_is_served(self):
        """A head of almost 16 KiB (big cookies) still opens a socket."""
        server = ServerFixture.start(self)
        request = ws_handshake(f"/public?token={token()}", server.public_port, {"X-Padding": ""})
        padding = "p" * (16 * 1024 - len(request))
        await raw_browser(self, server, headers={"X-Padding": padding})


class BadFrameTests(unittest.TestCase):
    """Frames that break RFC 6455 close only the connection that sent them."""

    timeout = HANG_GUARD * 3

    async def assert_closed_with(self, client, code: int):
        """Wait for the server's close frame, check its code, answer it and see the close."""
        await wait_until(lambda: close_frame(client) is not None)
        self.assertEqual(close_frame(client).close_code, code)
        client.transport.write(client_frame(OP_CLOSE, close_payload(code)))
        await guarded(client.done)

    async def test_invalid_utf8_text_is_1007(self):
        """A text frame that is not UTF-8 closes that browser with 1007."""
        server = ServerFixture.start(self)
        bystander = await registered_browser(self, server, "1")
        client = await raw_browser(self, server)
        client.transport.write(client_frame(OP_TEXT, b"register:\xff\xfe1"))
        await self.assert_closed_with(client, 1007)
        await assert_others_served(self, server, bystander)

    async def test_invalid_utf8_split_across_fragments_is_1007(self):
        """A UTF-8 sequence cut by a fragment boundary is fine; an invalid one is 1007."""
        server = ServerFixture.start(self)
        bystander = await registered_browser(self, server, "1")
        client = await raw_browser(self, server)
        euro = "€".encode("utf-8")
        client.transport.write(client_frame(OP_TEXT, b"hello " + euro[:2], fin=False)
                               + client_frame(OP_CONTINUATION, euro[2:] + b"\xc3\x28", fin=True))
        await self.assert_closed_with(client, 1007)
        await assert_others_served(self, server, bystander)

    async def test_reserved_opcode_is_1002(self):
        """A frame with reserved opcode 0x3 closes that browser with 1002."""
        server = ServerFixture.start(self)
        bystander = await registered_browser(self, server, "1")
        client = await raw_browser(self, server)
        client.transport.write(client_frame(0x3, b"what is this"))
        await self.assert_closed_with(client, 1002)
        await assert_others_served(self, server, bystander)

    async def test_unmasked_client_frame_is_1002(self):
        """A client frame without mask closes that browser with 1002."""
        server = ServerFixture.start(self)
        bystander = await registered_browser(self, server, "1")
        client = await raw_browser(self, server)
        client.transport.write(bytes([0x81, 5]) + b"hello")
        await self.assert_closed_with(client, 1002)
        await assert_others_served(self, server, bystander)

    async def test_ignored_close_is_dropped_after_close_timeout(self):
        """A client that never answers the server's close frame is dropped after close_timeout."""
        server = ServerFixture.start(self, limits_close_timeout="0.2")
        bystander = await registered_browser(self, server, "1")
        client = await raw_browser(self, server)
        client.transport.write(client_frame(OP_BINARY, b"\x00\x01"))
        await guarded(client.done)
        self.assertEqual(close_frame(client).close_code, 1003)
        await wait_until(lambda: server.service.broker.attached_count == 1)
        await assert_others_served(self, server, bystander)
