"""End to end on loopback: each [limits] protection against a misbehaving peer.

Keepalive, message size, connection caps, slow consumers, origins in pydio mode, failure
rate limits, trusted proxies, graceful shutdown and a Pydio host under a reconnect storm,
each seen from real clients while the other clients keep being served.
"""

from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, error, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from tests import support
from tests.fake_pydio import FakePydio, Held, Reply, registry, unreachable_url
from tests.support import (KEY, ServerFixture, handshake_status, post, registered_browser, request,
                           token, wait_until, ws_handshake)
from tests.test_e2e_hostile import (OP_CLOSE, OP_CONTINUATION, OP_TEXT, client_frame, close_frame,
                                    close_payload, guarded, raw_browser, raw_socket)

# A broken protection fails its test quickly instead of after trial's 120 s.
TIMEOUT = 30


class DeafBrowser(support.BrowserProtocol):
    """A browser that never answers pings (a peer gone without a FIN)."""

    def onPing(self, payload):
        pass


class CountingBrowser(support.BrowserProtocol):
    """A browser that answers pings and counts them."""

    pings = 0

    def onPing(self, payload):
        self.pings += 1
        super().onPing(payload)


async def open_browser(testcase, server: ServerFixture, query: str = "", headers=None,
                       protocol=support.BrowserProtocol):
    """A real Autobahn client of class `protocol`; fails with ConnectionError when refused."""
    factory = WebSocketClientFactory(server.public_url(query), headers=headers or {})
    factory.protocol = protocol
    factory.opened = defer.Deferred()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", server.public_port).connect(factory)
    client = await factory.opened
    testcase.addCleanup(client.close)
    return client


async def register(server: ServerFixture, client, repo: str = "1", count: int = 1):
    """Register `client` on `repo`; wait until the server counts `count` browsers there."""
    client.say(f"register:{repo}")
    await wait_until(lambda: server.service.broker.registered_counts().get(repo, 0) == count)


async def browser_status(server: ServerFixture, query: str = "", headers=None) -> int:
    """The status a raw handshake on the browser path gets."""
    return await guarded(handshake_status(
        server.public_port, ws_handshake(server.public_path + query, server.public_port, headers)))


async def refused_counts(testcase, server: ServerFixture) -> dict:
    """The refused handshakes by status, as GET /status reports them."""
    status, body = await request(testcase, "GET", server.private_url + "/status")
    testcase.assertEqual(status, 200)
    return body["handshakes_refused"]


async def publish_batch(testcase, server: ServerFixture, batch: int, size: int = 64 * 1024):
    """POST ten messages of `size` bytes to workspace 1, labelled by batch and index."""
    filler = "m" * size
    messages = [{"REPO_ID": "1", "CONTENT": f"{batch:03}{i}{filler}"} for i in range(10)]
    status, _ = await post(testcase, server.private_url, messages)
    testcase.assertEqual(status, 200)


def batch_labels(batches) -> list:
    """The labels (first four bytes) of the messages of `batches`, in publish order."""
    return [f"{batch:03}{i}".encode() for batch in batches for i in range(10)]


def capture_log(testcase) -> list:
    """Every log event emitted until the test ends."""
    events = []
    globalLogPublisher.addObserver(events.append)
    testcase.addCleanup(globalLogPublisher.removeObserver, events.append)
    return events


def event_text(event) -> str:
    """An event as text: its formatted message and every field value."""
    return formatEvent(event) + "\n" + "\n".join(f"{name}={value!r}" for name, value in event.items())


class KeepaliveTests(unittest.TestCase):
    """Pings find peers that vanished without closing."""

    timeout = TIMEOUT

    async def test_silent_peer_is_dropped_and_answering_peer_stays(self):
        """A browser that ignores pings is dropped after ping_interval + ping_timeout; one that
        answers stays open through several pings and still receives."""
        server = ServerFixture.start(self, limits_ping_interval="0.2", limits_ping_timeout="0.2")
        deaf = await open_browser(self, server, f"?token={token()}", protocol=DeafBrowser)
        alive = await open_browser(self, server, f"?token={token()}", protocol=CountingBrowser)
        await register(server, alive)
        code, _ = await guarded(deaf.closed)
        self.assertEqual(code, 1006)
        await wait_until(lambda: server.service.broker.attached_count == 1)
        self.assertEqual(server.service.stats.ping_timeouts, 1)
        await wait_until(lambda: alive.pings >= 4)
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "still-alive"})
        self.assertEqual(await guarded(alive.next_message()), b"still-alive")


class MessageSizeTests(unittest.TestCase):
    """Browsers send short commands: anything over max_message_size closes them with 1009."""

    timeout = TIMEOUT

    async def test_frame_over_limit_is_1009(self):
        """One text frame over max_message_size closes the browser with 1009."""
        server = ServerFixture.start(self, limits_max_message_size="1KiB")
        other = await registered_browser(self, server, "1")
        client = await open_browser(self, server, f"?token={token()}")
        client.say("register:" + "x" * 1100)
        code, _ = await guarded(client.closed)
        self.assertEqual(code, 1009)
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "others-served"})
        self.assertEqual(await guarded(other.next_message()), b"others-served")
        await wait_until(lambda: server.service.stats.closes[1009] == 1)

    async def test_frame_at_limit_is_accepted(self):
        """A command of exactly max_message_size bytes is processed."""
        server = ServerFixture.start(self, limits_max_message_size="1KiB")
        client = await open_browser(self, server, f"?token={token()}")
        client.say("unknown:" + "x" * (1024 - len("unknown:")))
        await wait_until(lambda: server.service.stats.ignored_commands == 1)
        self.assertEqual(client.state, client.STATE_OPEN)

    async def test_fragmented_message_over_limit_is_1009(self):
        """Small fragments (FIN on the last only) adding up to more than the limit get 1009."""
        server = ServerFixture.start(self, limits_max_message_size="1KiB")
        other = await registered_browser(self, server, "1")
        client = await raw_browser(self, server)
        piece = b"x" * 400
        client.transport.write(client_frame(OP_TEXT, b"unknown:" + piece, fin=False)
                               + client_frame(OP_CONTINUATION, piece, fin=False)
                               + client_frame(OP_CONTINUATION, piece, fin=True))
        await wait_until(lambda: close_frame(client) is not None)
        self.assertEqual(close_frame(client).close_code, 1009)
        client.transport.write(client_frame(OP_CLOSE, close_payload(1009)))
        await guarded(client.done)
        self.assertEqual(server.service.stats.ignored_commands, 0)
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "others-served"})
        self.assertEqual(await guarded(other.next_message()), b"others-served")


class ConnectionCapTests(unittest.TestCase):
    """Connection caps refuse at the handshake with 503, and free up on close."""

    timeout = TIMEOUT

    def setUp(self):
        self.events = capture_log(self)

    async def assert_cap(self, server):
        first = await registered_browser(self, server, "1")
        second = await registered_browser(self, server, "1")
        self.assertEqual(await browser_status(server, f"?token={token()}"), 503)
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "both-open"})
        self.assertEqual(await guarded(first.next_message()), b"both-open")
        self.assertEqual(await guarded(second.next_message()), b"both-open")
        await first.close()
        await wait_until(lambda: server.service.broker.attached_count == 1)
        third = await registered_browser(self, server, "1")
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "third-in"})
        self.assertEqual(await guarded(third.next_message()), b"third-in")
        self.assertEqual(await refused_counts(self, server), {"503": 1})
        refusals = [event for event in self.events if event.get("status") == 503]
        self.assertEqual(len(refusals), 1)
        self.assertEqual(refusals[0]["peer"], "127.0.0.1")

    async def test_per_ip_cap_is_503_and_freed_on_close(self):
        """With max_connections_per_ip = 2 the third browser from one IP gets 503 until one closes."""
        await self.assert_cap(ServerFixture.start(self, limits_max_connections_per_ip="2"))

    async def test_total_cap_is_503_and_freed_on_close(self):
        """With max_connections = 2 the third browser gets 503 until one closes."""
        await self.assert_cap(ServerFixture.start(self, limits_max_connections="2"))

    async def test_refused_authentications_do_not_hold_a_slot(self):
        """Handshakes refused by authentication release their slot at once."""
        server = ServerFixture.start(self, limits_max_connections="1")
        for _ in range(3):
            self.assertEqual(await browser_status(server, "?token=forged"), 401)
        await wait_until(lambda: server.service.browser_factory.counter.total == 0)
        await registered_browser(self, server, "1")


class SlowConsumerTests(unittest.TestCase):
    """A browser that stops reading is closed before the server buffers without bound."""

    timeout = TIMEOUT

    async def test_stalled_reader_is_closed_1008_and_others_get_everything(self):
        """A client that stops reading is closed with 1008 "slow consumer" once
        max_pending_bytes behind, while a reading client gets every message."""
        events = capture_log(self)
        server = ServerFixture.start(self, limits_max_pending_bytes="1MiB")
        reader = await registered_browser(self, server, "1")
        stalled = await open_browser(self, server, f"?token={token(user='bob')}")
        await register(server, stalled, count=2)
        stalled.transport.pauseProducing()
        batches = 0
        # Nothing is pending in the server until the kernel's socket buffers are full:
        # publish until the drop, however large those buffers are.
        while server.service.stats.slow_consumers == 0 and batches < 100:
            await publish_batch(self, server, batches)
            batches += 1
        await post(self, server.private_url, [{"REPO_ID": "1", "CONTENT": f"after{i}"} for i in range(2)])
        self.assertEqual(server.service.stats.slow_consumers, 1)
        stalled.transport.resumeProducing()
        code, reason = await guarded(stalled.closed)
        self.assertEqual((code, reason), (1008, "slow consumer"))
        await wait_until(lambda: server.service.broker.attached_count == 1)
        received = [await guarded(reader.next_message()) for _ in range(batches * 10 + 2)]
        self.assertEqual([message[:4] for message in received[:-2]], batch_labels(range(batches)))
        self.assertEqual(received[-2:], [b"after0", b"after1"])
        self.assertEqual(server.service.stats.slow_consumers, 1)
        drops = [event for event in events if "slow consumer" in event.get("log_format", "")]
        self.assertEqual([(event["peer"], event["user_id"]) for event in drops], [("127.0.0.1", "bob")])


class PydioOriginTests(unittest.TestCase):
    """In pydio auth mode without allowed_origins, only pydio_url's origin may open a socket."""

    timeout = TIMEOUT

    async def test_only_pydio_origin_or_none_is_accepted(self):
        """pydio_url's origin and no Origin are accepted; any other origin gets 403 and its
        cookie never reaches the Pydio host."""
        fake = FakePydio(reactor)
        await fake.start()
        self.addCleanup(fake.stop)
        fake.replies["sid=alice"] = Reply(registry("alice", None, {"1": "r"}))
        server = ServerFixture.start(self, auth_mode="pydio", auth_pydio_url=fake.url, auth_cache_ttl="0")
        pydio_origin = fake.base_url.rsplit("/pydio/", 1)[0]
        port = int(pydio_origin.rsplit(":", 1)[1])
        for origin in ("http://evil.example", f"http://127.0.0.1:{port + 1}",
                       f"https://127.0.0.1:{port}", f"http://127.0.0.1.evil.example:{port}"):
            self.assertEqual(
                await browser_status(server, headers={"Origin": origin, "Cookie": "sid=alice"}), 403,
                origin)
        self.assertEqual(fake.received, [])
        self.assertEqual(
            await browser_status(server, headers={"Origin": pydio_origin, "Cookie": "sid=alice"}), 101)
        self.assertEqual(await browser_status(server, headers={"Cookie": "sid=alice"}), 101)
        self.assertEqual(len(fake.received), 2)
        self.assertEqual(await refused_counts(self, server), {"403": 4})

    async def test_null_origin_is_403(self):
        """A sandboxed page's "Origin: null" is a refused origin like any other: 403, counted."""
        fake = FakePydio(reactor)
        await fake.start()
        self.addCleanup(fake.stop)
        fake.replies["sid=alice"] = Reply(registry("alice", None, {"1": "r"}))
        server = ServerFixture.start(self, auth_mode="pydio", auth_pydio_url=fake.url)
        self.assertEqual(
            await browser_status(server, headers={"Origin": "null", "Cookie": "sid=alice"}), 403)
        self.assertEqual(fake.received, [])
        self.assertEqual(await refused_counts(self, server), {"403": 1})


class FailureRateLimitTests(unittest.TestCase):
    """Repeated failures from one IP are refused with 429 before any credential is checked."""

    timeout = TIMEOUT

    async def test_bad_tokens_then_valid_token_is_429(self):
        """After max_auth_failures bad tokens from an IP, even a valid token gets 429."""
        events = capture_log(self)
        server = ServerFixture.start(self, limits_max_auth_failures="3")
        bad_tokens = [token(key="guessed-key-0123456789abcdefghijkl"), token(ttl=-60), "forged.token.value"]
        for bad in bad_tokens:
            self.assertEqual(await browser_status(server, f"?token={bad}"), 401)
        valid = token()
        self.assertEqual(await browser_status(server, f"?token={valid}"), 429)
        self.assertEqual(await browser_status(server, headers={"Authorization": f"Bearer {valid}"}), 429)
        self.assertEqual(await refused_counts(self, server), {"401": 3, "429": 2})
        leaked = [event_text(event) for event in events
                  if any(secret in event_text(event) for secret in bad_tokens + [valid, KEY])]
        self.assertEqual(leaked, [])

    async def test_bad_keys_then_right_key_is_429_and_keys_are_never_logged(self):
        """After max_auth_failures bad keys, the right key gets 429; no key is ever logged."""
        events = capture_log(self)
        server = ServerFixture.start(self, limits_max_auth_failures="3")
        bad_keys = ["guess-one-0123456789abcdef", "guess-two-0123456789abcdef", KEY + "x"]
        message = {"REPO_ID": "1", "CONTENT": "x"}
        for bad in bad_keys:
            self.assertEqual((await post(self, server.private_url, message, key=bad))[0], 401)
        status, body = await post(self, server.private_url, message)
        self.assertEqual(status, 429)
        self.assertIn("too many bad keys", body["error"])
        self.assertEqual(server.service.stats.received, 0)
        leaked = [event_text(event) for event in events
                  if any(secret in event_text(event) for secret in bad_keys + [KEY])]
        self.assertEqual(leaked, [])
        self.assertTrue(any("wrong private key" in event_text(event) for event in events))


class TrustedProxyTests(unittest.TestCase):
    """X-Forwarded-For counts only when the peer is a trusted proxy."""

    timeout = TIMEOUT

    async def test_forwarded_host_is_authorized_behind_trusted_proxy(self):
        """Behind a trusted proxy the forwarded client is checked against authorized_hosts."""
        server = ServerFixture.start(self, limits_trusted_proxies="127.0.0.1",
                                     private_authorized_hosts="10.0.0.0/8")
        message = {"REPO_ID": "1", "CONTENT": "x"}
        forwarded = {"X-Forwarded-For": ["10.1.2.3"]}
        self.assertEqual((await post(self, server.private_url, message, headers=forwarded))[0], 200)
        self.assertEqual((await post(self, server.private_url, message))[0], 403)
        spoofed = {"X-Forwarded-For": ["10.1.2.3, 192.0.2.7"]}
        self.assertEqual((await post(self, server.private_url, message, headers=spoofed))[0], 403)

    async def test_forwarded_for_is_ignored_without_trusted_proxies(self):
        """Without trusted_proxies a forged X-Forwarded-For does not authorize the peer."""
        server = ServerFixture.start(self, private_authorized_hosts="10.0.0.0/8")
        message = {"REPO_ID": "1", "CONTENT": "x"}
        forwarded = {"X-Forwarded-For": ["10.1.2.3"]}
        self.assertEqual((await post(self, server.private_url, message, headers=forwarded))[0], 403)

    async def test_limits_count_per_forwarded_client(self):
        """Behind a trusted proxy, failures and connection caps count per forwarded client."""
        server = ServerFixture.start(self, limits_trusted_proxies="127.0.0.1",
                                     limits_max_auth_failures="2", limits_max_connections_per_ip="1")
        mallory, alice = {"X-Forwarded-For": "198.51.100.1"}, {"X-Forwarded-For": "198.51.100.2"}
        for _ in range(2):
            self.assertEqual(await browser_status(server, "?token=forged", mallory), 401)
        self.assertEqual(await browser_status(server, f"?token={token()}", mallory), 429)
        await open_browser(self, server, f"?token={token()}", headers=alice)
        self.assertEqual(await browser_status(server, f"?token={token()}", alice), 503)
        await open_browser(self, server, f"?token={token()}", headers={"X-Forwarded-For": "198.51.100.3"})


class ShutdownTests(unittest.TestCase):
    """stopService closes every browser with 1001 within shutdown_timeout, losing nothing."""

    timeout = TIMEOUT

    async def test_stop_closes_browsers_with_1001(self):
        """stopService closes open browsers with 1001, stops listening, and fires."""
        server = ServerFixture.start(self)
        browsers = [await registered_browser(self, server, "1") for _ in range(3)]
        stopped = server.service.stopService()
        for browser in browsers:
            code, _ = await guarded(browser.closed)
            self.assertEqual(code, 1001)
        await guarded(stopped)
        self.assertEqual(server.service.broker.attached_count, 0)
        with self.assertRaises(error.ConnectionRefusedError):
            await support.raw_connect(server.public_port)

    async def test_second_stop_is_harmless(self):
        """Stopping an already stopped service fires again without error."""
        server = ServerFixture.start(self)
        await registered_browser(self, server, "1")
        await guarded(server.service.stopService())
        await guarded(server.service.stopService())

    async def test_client_ignoring_close_is_dropped_after_shutdown_timeout(self):
        """A browser that never answers the 1001 close is dropped after shutdown_timeout and
        stopService fires."""
        server = ServerFixture.start(self, limits_shutdown_timeout="0.2", limits_close_timeout="60")
        client = await raw_browser(self, server)
        polite = await registered_browser(self, server, "1")
        stopped = server.service.stopService()
        code, _ = await guarded(polite.closed)
        self.assertEqual(code, 1001)
        await wait_until(lambda: stopped.called)
        await guarded(client.done)
        self.assertEqual(close_frame(client).close_code, 1001)
        await stopped

    async def test_published_before_stop_is_delivered_before_1001(self):
        """A message answered 200 before the stop reaches the browser before its 1001 close."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        status, _ = await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "before-stop"})
        self.assertEqual(status, 200)
        stopped = server.service.stopService()
        code, _ = await guarded(browser.closed)
        self.assertEqual(code, 1001)
        self.assertEqual(browser.received.pending, [b"before-stop"])
        await guarded(stopped)

    async def test_backlog_of_a_lagging_browser_is_delivered_before_1001(self):
        """Messages answered 200 but still waiting for a lagging browser's socket reach it
        before its 1001 close."""
        server = ServerFixture.start(self, limits_max_pending_bytes="64MiB")
        browser = await registered_browser(self, server, "1")
        browser.transport.pauseProducing()
        for batch in range(20):
            await publish_batch(self, server, batch)
        status, _ = await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "last"})
        self.assertEqual(status, 200)
        stopped = server.service.stopService()
        browser.transport.resumeProducing()
        code, _ = await guarded(browser.closed)
        self.assertEqual(code, 1001)
        received = browser.received.pending
        self.assertEqual([message[:4] for message in received[:-1]], batch_labels(range(20)))
        self.assertEqual(received[-1], b"last")
        await guarded(stopped)


class PydioStormTests(unittest.TestCase):
    """A reconnect storm against a slow or dead Pydio host is bounded and recovers."""

    timeout = TIMEOUT

    async def pydio_host(self) -> FakePydio:
        fake = FakePydio(reactor)
        await fake.start()
        self.addCleanup(fake.stop)
        return fake

    async def test_queue_over_max_queued_is_503_at_once(self):
        """With one request in flight and max_queued waiting, the next browser gets 503 "busy"
        at once; the queued ones are accepted when the host answers."""
        fake = await self.pydio_host()
        held = Held()
        for number in range(5):
            fake.replies[f"sid={number}"] = held
        server = ServerFixture.start(self, auth_mode="pydio", auth_pydio_url=fake.url,
                                     auth_max_concurrent="1", auth_max_queued="2")
        waiting = [defer.ensureDeferred(open_browser(self, server, headers={"Cookie": f"sid={number}"}))
                   for number in range(3)]
        await wait_until(lambda: server.service.browser_factory.counter.total == 3)
        await wait_until(lambda: len(fake.received) == 1)
        client = await raw_socket(self, server.public_port)
        client.transport.write(ws_handshake(server.public_path, server.public_port, {"Cookie": "sid=3"}))
        answer = await guarded(client.head)
        self.assertEqual(support.status_of(answer), 503)
        self.assertIn(b"busy", answer)
        self.assertFalse(any(browser.called for browser in waiting))
        held.release(Reply(registry("alice", None, {"1": "r"})))
        browsers = [await guarded(browser) for browser in waiting]
        for count, browser in enumerate(browsers, 1):
            await register(server, browser, count=count)
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "after-storm"})
        for browser in browsers:
            self.assertEqual(await guarded(browser.next_message()), b"after-storm")
        self.assertEqual(len(fake.received), 3)

    async def test_slow_host_is_503_after_timeout_then_recovers(self):
        """A host that does not answer within auth.timeout gives 503; once it answers,
        browsers are accepted again."""
        fake = await self.pydio_host()
        held = Held()
        fake.replies["sid=alice"] = held
        server = ServerFixture.start(self, auth_mode="pydio", auth_pydio_url=fake.url,
                                     auth_timeout="0.2")
        self.assertEqual(await browser_status(server, headers={"Cookie": "sid=alice"}), 503)
        held.release(Reply(registry("alice", None, {"1": "r"})))
        self.assertEqual(await browser_status(server, headers={"Cookie": "sid=alice"}), 101)

    async def test_host_down_is_503_and_recovers_without_restart(self):
        """A host that cannot be reached gives 503; when it listens again browsers are accepted."""
        url = await unreachable_url(reactor)
        server = ServerFixture.start(self, auth_mode="pydio", auth_pydio_url=url)
        for _ in range(3):
            self.assertEqual(await browser_status(server, headers={"Cookie": "sid=alice"}), 503)
        fake = ReturningPydio(reactor)
        await fake.start_at(url)
        self.addCleanup(fake.stop)
        fake.replies["sid=alice"] = Reply(registry("alice", None, {"1": "r"}))
        browser = await open_browser(self, server, headers={"Cookie": "sid=alice"})
        await register(server, browser)
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "host-back"})
        self.assertEqual(await guarded(browser.next_message()), b"host-back")


class ReturningPydio(FakePydio):
    """A fake Pydio host that comes back on the port of a URL that was unreachable."""

    async def start_at(self, url: str) -> str:
        port = int(url.split("/")[2].rsplit(":", 1)[1])
        self._port = self._reactor.listenTCP(port, self._site, interface="127.0.0.1")
        self.url = url
        return url
