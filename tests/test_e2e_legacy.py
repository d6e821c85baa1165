"""End to end on loopback: Pydio 6 publishers (legacy PHP WebSocket client, PHP bodies)."""

import json
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from pydio_ws.phpserialize import dumps, loads
from tests.legacy_publisher import (legacy_frame, legacy_handshake, legacy_publish,
                                    parse_client_stream, php_message, stray_bytes)
from tests.support import (KEY, BrowserProtocol, ServerFixture, connect_browser, handshake_status,
                           post, raw_connect, registered_browser, status_of, token, wait_until,
                           ws_handshake)

FIXTURES = Path(__file__).resolve().parent.parent / ".." / "shared" / "fixtures" / "phpws"
HEAD_AND_STRAY = 243 + 8


def content_of_size(size: int, marker: str) -> str:
    """A CONTENT string whose PHP payload is exactly `size` bytes."""
    base = len(php_message(f"<tree>{marker}</tree>"))
    for padding in range(size - base, size - base - 10, -1):
        content = f"<tree>{marker}{' ' * padding}</tree>"
        if len(php_message(content)) == size:
            return content
    raise ValueError(f"cannot make a {size}-byte payload")


class LegacyPublisherTests(unittest.TestCase):
    """The Pydio 6 PHP client's exact byte stream is accepted on the private path."""

    async def test_every_length_form_split_writes_and_close_without_close_frame(self):
        """7-bit, 16-bit and 64-bit (non-minimal too) frames, in 4 KiB pieces, all arrive."""
        server = ServerFixture.start(self, shared=False)
        browser = await registered_browser(self, server, "1")
        sizes = (98, 255, 65024, 65025, 65109, 65535, 69962)
        contents = [content_of_size(size, f"m{size}") for size in sizes]
        frames = b"".join(legacy_frame(php_message(content)) for content in contents)
        head = legacy_handshake("127.0.0.1", server.private_port, "/private", KEY)
        answer = await legacy_publish(server.private_port, head, stray_bytes(), frames)
        self.assertEqual(status_of(answer), 101)
        for content in contents:
            self.assertEqual(await browser.next_message(), content.encode())

    async def test_stray_bytes_that_look_like_frames_are_skipped(self):
        """Stray bytes such as CRLF CRLF or a frame header are not taken for data."""
        server = ServerFixture.start(self, shared=False)
        browser = await registered_browser(self, server, "1")
        head = legacy_handshake("127.0.0.1", server.private_port, "/private", KEY)
        for stray in (b"\r\n\r\n\x81\x85\x00\x00", b"\x85\x00\x00\x00\x00\x00\x00\x00", b"\x00" * 8):
            await legacy_publish(server.private_port, head, stray,
                                 legacy_frame(php_message(f"after {stray!r}")))
            self.assertEqual(await browser.next_message(), f"after {stray!r}".encode())

    async def test_stray_bytes_split_across_reads_are_skipped(self):
        """Stray bytes arriving after the answer in another read are still skipped."""
        server = ServerFixture.start(self, shared=False)
        browser = await registered_browser(self, server, "1")
        client = await raw_connect(server.private_port)
        client.transport.write(legacy_handshake("127.0.0.1", server.private_port, "/private", KEY) + b"\x81\x05")
        await client.head
        client.transport.write(b"\x00\x00\x00\x00\x00\x00" + legacy_frame(php_message("split stray")))
        self.assertEqual(await browser.next_message(), b"split stray")
        client.transport.loseConnection()
        await client.done

    async def test_wrong_key_is_refused_at_once_and_nothing_published(self):
        """A wrong Admin-Key gets 401 right away; the frames sent anyway are dropped."""
        server = ServerFixture.start(self, shared=False)
        browser = await registered_browser(self, server, "1")
        head = legacy_handshake("127.0.0.1", server.private_port, "/private", "wrong")
        answer = await legacy_publish(server.private_port, head, stray_bytes(),
                                      legacy_frame(php_message("must not arrive")))
        self.assertEqual(status_of(answer), 401)
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "barrier"})
        self.assertEqual(await browser.next_message(), b"barrier")

    async def test_unauthorized_host_is_refused_before_the_key(self):
        """A legacy publisher from outside authorized_hosts gets 403 even with the right key."""
        server = ServerFixture.start(self, shared=False, private_authorized_hosts="10.0.0.0/8")
        head = legacy_handshake("127.0.0.1", server.private_port, "/private", KEY)
        answer = await legacy_publish(server.private_port, head, stray_bytes(), b"")
        self.assertEqual(status_of(answer), 403)

    async def test_browsers_stay_strict_about_length_encoding(self):
        """The non-minimal length form is a protocol error (1002) on a browser socket."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        browser.transport.write(legacy_frame(b"register:1", length_form="64"))
        code, _ = await browser.closed
        self.assertEqual(code, 1002)


class StandardPublisherTests(unittest.TestCase):
    """An RFC 6455 publisher with a key header sends JSON or PHP frames."""

    async def connect_publisher(self, server, key=KEY):
        factory = WebSocketClientFactory(f"ws://127.0.0.1:{server.private_port}/private",
                                         headers={"X-Pydio-Key": key})
        factory.protocol = BrowserProtocol
        factory.opened = defer.Deferred()
        await TCP4ClientEndpoint(reactor, "127.0.0.1", server.private_port).connect(factory)
        publisher = await factory.opened
        self.addCleanup(publisher.close)
        return publisher

    async def test_json_and_php_frames_are_published(self):
        """JSON and PHP-serialized frames both reach the browser, in order."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        publisher = await self.connect_publisher(server)
        publisher.sendMessage(json.dumps({"REPO_ID": "1", "CONTENT": "json"}).encode())
        publisher.sendMessage(php_message("php"))
        self.assertEqual(await browser.next_message(), b"json")
        self.assertEqual(await browser.next_message(), b"php")

    async def test_bad_frame_gets_error_reply_and_stays_open(self):
        """A bad payload is answered with {"error": ...}; the next good one still publishes."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        publisher = await self.connect_publisher(server)
        publisher.sendMessage(b'O:8:"stdClass":0:{}')
        reply = json.loads(await publisher.next_message())
        self.assertIn("error", reply)
        publisher.sendMessage(php_message("good"))
        self.assertEqual(await browser.next_message(), b"good")

    async def test_bad_key_is_refused_at_handshake(self):
        """A publisher with a wrong X-Pydio-Key gets 401 at the handshake."""
        server = ServerFixture.start(self)
        request = ws_handshake("/private", server.private_port, {"X-Pydio-Key": "wrong"})
        self.assertEqual(await handshake_status(server.private_port, request), 401)


class PHPBodyTests(unittest.TestCase):
    """PHP serialize() bodies on the HTTP publish endpoint."""

    async def test_php_body_with_utf8_and_node_paths_is_delivered(self):
        """A PHP body with UTF-8 byte lengths, USER_ID and NODE_PATHES is delivered."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1", user="alice")
        body = php_message("<tree>Été</tree>", USER_ID="alice", NODE_PATHES=["/Été/résumé.txt"])
        status, answer = await post(self, server.private_url, body)
        self.assertEqual((status, answer), (200, {"published": 1}))
        self.assertEqual(await browser.next_message(), "<tree>Été</tree>".encode())

    async def test_php_object_is_refused_with_400(self):
        """A PHP object in the body is refused with 400, never instantiated."""
        server = ServerFixture.start(self)
        status, answer = await post(self, server.private_url,
                                    b'a:2:{s:7:"REPO_ID";O:8:"stdClass":0:{}s:7:"CONTENT";s:1:"x";}')
        self.assertEqual(status, 400)
        self.assertIn("object", answer["error"])


class SinglePathTests(unittest.TestCase):
    """Pydio 6's single-path setup: browsers and publishers share one path."""

    def start(self, **settings):
        return ServerFixture.start(self, public_path="/ws", private_path="/ws", **settings)

    async def test_legacy_publisher_and_browser_share_the_path(self):
        """A handshake with Admin-Key publishes; one without is a browser; both on /ws."""
        server = self.start()
        browser = await registered_browser(self, server, "1")
        head = legacy_handshake("127.0.0.1", server.private_port, "/ws", KEY)
        await legacy_publish(server.private_port, head, stray_bytes(), legacy_frame(php_message("one path")))
        self.assertEqual(await browser.next_message(), b"one path")

    async def test_post_on_the_shared_path_publishes(self):
        """A POST to the shared path is an HTTP publish."""
        server = self.start()
        browser = await registered_browser(self, server, "1")
        status, _ = await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "posted"})
        self.assertEqual(status, 200)
        self.assertEqual(await browser.next_message(), b"posted")

    async def test_publisher_key_header_is_checked_like_the_private_side(self):
        """On the shared path, a wrong Admin-Key is 401 and an unauthorized host is 403."""
        server = self.start()
        wrong = legacy_handshake("127.0.0.1", server.private_port, "/ws", "wrong")
        self.assertEqual(status_of(await legacy_publish(server.private_port, wrong, stray_bytes(), b"")), 401)
        server = self.start(private_authorized_hosts="10.0.0.0/8")
        right = legacy_handshake("127.0.0.1", server.private_port, "/ws", KEY)
        self.assertEqual(status_of(await legacy_publish(server.private_port, right, stray_bytes(), b"")), 403)

    async def test_browser_on_shared_path_needs_a_token(self):
        """A handshake without a publisher key on the shared path is a browser: 401 without token."""
        server = self.start()
        request = ws_handshake("/ws", server.public_port)
        self.assertEqual(await handshake_status(server.public_port, request), 401)
        browser = await connect_browser(self, server.public_url(f"?token={token()}"), server.public_port)
        self.assertIsNotNone(browser)


class CaptureReplayTests(unittest.TestCase):
    """The captured bytes of a real Pydio 6.4 host replay end to end."""

    def captures(self):
        if not FIXTURES.is_dir():
            raise unittest.SkipTest(f"no captures at {FIXTURES}")
        return sorted(FIXTURES.glob("*.bin"))

    async def test_captures_replay_byte_for_byte(self):
        """Each capture, sent verbatim, delivers every message it carries."""
        for capture in self.captures():
            data = capture.read_bytes()
            _, _, payloads = parse_client_stream(data)
            server = ServerFixture.start(self, private_key="s3cret-key")
            expected = [loads(payload) for payload in payloads]
            repo = str(expected[0]["REPO_ID"])
            browser = await registered_browser(self, server, repo, user="alice", group="/g1",
                                               repos={repo: "r"}, key="s3cret-key")
            answer = await legacy_publish(server.private_port, data[:HEAD_AND_STRAY - 8],
                                          data[HEAD_AND_STRAY - 8:HEAD_AND_STRAY], data[HEAD_AND_STRAY:])
            self.assertEqual(status_of(answer), 101, capture.name)
            for fields in expected:
                self.assertEqual(await browser.next_message(), fields["CONTENT"].encode(), capture.name)
            await wait_until(lambda: server.service.stats.received == len(expected))
