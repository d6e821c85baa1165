"""End to end on loopback: browsers over real WebSockets, publishing over real HTTP."""

import gc
import types
import weakref

from twisted.internet import reactor, task
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.trial import unittest

from tests.support import (KEY, ServerFixture, connect_browser, handshake_status, post,
                           registered_browser, request, token, wait_until, ws_handshake)


class DeliveryTests(unittest.TestCase):
    """What reaches which browser."""

    async def test_registered_browser_receives_content(self):
        """A browser registered on a workspace receives exactly the CONTENT published there."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        status, body = await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "<tree/>"})
        self.assertEqual((status, body), (200, {"published": 1}))
        self.assertEqual(await browser.next_message(), b"<tree/>")

    async def test_other_workspace_user_group_are_skipped(self):
        """Messages for another workspace, user or group are not delivered; the barrier is."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1", user="alice", group="/sales")
        for skipped in ({"REPO_ID": "2", "CONTENT": "other-repo"},
                        {"REPO_ID": "1", "CONTENT": "other-user", "USER_ID": "bob"},
                        {"REPO_ID": "1", "CONTENT": "other-group", "GROUP_PATH": "/hr"},
                        {"REPO_ID": "1", "CONTENT": "barrier", "USER_ID": "alice",
                         "GROUP_PATH": "/sales"}):
            await post(self, server.private_url, skipped)
        self.assertEqual(await browser.next_message(), b"barrier")

    async def test_unregistered_browser_gets_only_all_workspace_messages(self):
        """After unregister, workspace messages stop but AJXP_REPO_SCOPE_ALL still arrives."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        browser.say("unregister:")
        await wait_until(lambda: not server.service.broker.registered_counts())
        await post(self, server.private_url, [{"REPO_ID": "1", "CONTENT": "skipped"},
                                              {"REPO_ID": "AJXP_REPO_SCOPE_ALL", "CONTENT": "all"}])
        self.assertEqual(await browser.next_message(), b"all")

    async def test_write_only_acl_cannot_register(self):
        """register: on a workspace whose acl lacks "r" is ignored and the socket stays open."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, None, repos={"1": "w", "2": "r"})
        browser.say("register:1")
        browser.say("register:2")
        await wait_until(lambda: server.service.broker.registered_counts() == {"2": 1})
        await post(self, server.private_url, [{"REPO_ID": "1", "CONTENT": "write-only"},
                                              {"REPO_ID": "2", "CONTENT": "readable"}])
        self.assertEqual(await browser.next_message(), b"readable")

    async def test_register_replaces_previous_workspace(self):
        """A second register: moves the browser to the new workspace."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1", repos={"1": "r", "2": "r"})
        browser.say("register:2")
        await wait_until(lambda: server.service.broker.registered_counts() == {"2": 1})
        await post(self, server.private_url, [{"REPO_ID": "1", "CONTENT": "old"},
                                              {"REPO_ID": "2", "CONTENT": "new"}])
        self.assertEqual(await browser.next_message(), b"new")

    async def test_unknown_command_is_ignored(self):
        """An unknown text command is counted and the socket stays usable."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        browser.say("hello")
        await wait_until(lambda: server.service.stats.ignored_commands == 1)
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "still-open"})
        self.assertEqual(await browser.next_message(), b"still-open")
        self.assertEqual(server.service.stats.ignored_commands, 1)

    async def test_binary_frame_closes_with_1003(self):
        """A binary frame from a browser closes its socket with 1003."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        browser.sendMessage(b"\x00\x01", isBinary=True)
        code, _ = await browser.closed
        self.assertEqual(code, 1003)

    async def test_order_is_kept_per_publisher(self):
        """Messages of one batch arrive in publish order."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        await post(self, server.private_url, [{"REPO_ID": "1", "CONTENT": str(i)} for i in range(20)])
        received = [await browser.next_message() for _ in range(20)]
        self.assertEqual(received, [str(i).encode() for i in range(20)])

    async def test_two_listeners_deliver(self):
        """With different public and private addresses, two listeners serve the two sides."""
        server = ServerFixture.start(self, shared=False)
        self.assertNotEqual(server.public_port, server.private_port)
        browser = await registered_browser(self, server, "1")
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "split"})
        self.assertEqual(await browser.next_message(), b"split")


class HandshakeTests(unittest.TestCase):
    """Refusals happen at the opening handshake, with an HTTP status."""

    async def handshake_status(self, server, path, headers=None, version=13):
        return await handshake_status(server.public_port,
                                      ws_handshake(path, server.public_port, headers, version))

    async def test_missing_token_is_401(self):
        """No token: 401."""
        server = ServerFixture.start(self)
        self.assertEqual(await self.handshake_status(server, "/public"), 401)

    async def test_bad_signature_and_expired_token_are_401(self):
        """A token signed with another key, or expired, gets 401."""
        server = ServerFixture.start(self)
        for bad in (token(key="another-key"), token(ttl=-60)):
            self.assertEqual(await self.handshake_status(server, f"/public?token={bad}"), 401)

    async def test_bearer_header_is_accepted(self):
        """Authorization: Bearer carries the token as well as ?token=."""
        server = ServerFixture.start(self)
        browser = await connect_browser(self, server.public_url(), server.public_port,
                                        headers={"Authorization": f"Bearer {token()}"})
        browser.say("register:1")
        await wait_until(lambda: server.service.broker.registered_counts() == {"1": 1})
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "hi"})
        self.assertEqual(await browser.next_message(), b"hi")

    async def test_forbidden_origin_is_403(self):
        """An Origin outside allowed_origins gets 403; an allowed one is accepted."""
        server = ServerFixture.start(self, public_allowed_origins="https://pydio.example")
        path = f"/public?token={token()}"
        self.assertEqual(await self.handshake_status(server, path, {"Origin": "https://evil.example"}), 403)
        self.assertEqual(await self.handshake_status(server, path, {"Origin": "https://pydio.example"}), 101)

    async def test_a_refusal_is_logged_once(self):
        """A refused handshake gives our one info event, and no warning from Autobahn."""
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        server = ServerFixture.start(self)
        self.assertEqual(await self.handshake_status(server, "/public"), 401)
        refusals = [e for e in events if "refused" in e.get("log_format", "")]
        warnings = [e for e in events if e.get("log_level") in (LogLevel.warn, LogLevel.error)]
        self.assertEqual((len(refusals), warnings), (1, []))

    async def test_unknown_path_is_404(self):
        """A WebSocket upgrade on an unknown path gets 404."""
        server = ServerFixture.start(self)
        self.assertEqual(await self.handshake_status(server, "/nowhere"), 404)

    async def test_browser_must_speak_rfc6455(self):
        """Browsers stay strict: an old protocol version is refused with 400."""
        server = ServerFixture.start(self)
        self.assertEqual(await self.handshake_status(server, f"/public?token={token()}", version=8), 400)

    async def test_plain_http_on_public_path_is_426(self):
        """A plain GET on the browser path is told to upgrade."""
        server = ServerFixture.start(self)
        status, _ = await request(self, "GET", f"http://127.0.0.1:{server.public_port}/public")
        self.assertEqual(status, 426)


class PrivateEndpointTests(unittest.TestCase):
    """Every status of the HTTP publish endpoint."""

    async def test_wrong_or_missing_key_is_401(self):
        """A wrong key or no key gets 401 and publishes nothing."""
        server = ServerFixture.start(self)
        message = {"REPO_ID": "1", "CONTENT": "x"}
        self.assertEqual((await post(self, server.private_url, message, key="nope"))[0], 401)
        self.assertEqual((await post(self, server.private_url, message, key=None))[0], 401)
        self.assertEqual(server.service.stats.received, 0)

    async def test_legacy_and_bearer_key_headers_are_accepted(self):
        """The key may come as Admin-Key or Authorization: Bearer."""
        server = ServerFixture.start(self)
        message = {"REPO_ID": "1", "CONTENT": "x"}
        for headers in ({"Admin-Key": [KEY]}, {"Authorization": [f"Bearer {KEY}"]}):
            status, _ = await post(self, server.private_url, message, key=None, headers=headers)
            self.assertEqual(status, 200)

    async def test_unauthorized_host_is_403_before_key(self):
        """A peer outside authorized_hosts gets 403 even with the right key."""
        server = ServerFixture.start(self, private_authorized_hosts="10.0.0.0/8")
        status, body = await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "x"})
        self.assertEqual(status, 403)
        self.assertIn("not authorized", body["error"])

    async def test_bad_bodies_are_400_with_reason(self):
        """Bad JSON or a bad field gets 400 with the precise reason."""
        server = ServerFixture.start(self)
        cases = [(b"{not json", "invalid JSON"),
                 ({"CONTENT": "x"}, "REPO_ID is missing"),
                 ({"REPO_ID": "1"}, "CONTENT is missing"),
                 ({"REPO_ID": "1", "CONTENT": 3}, "CONTENT must be a string"),
                 ([{"REPO_ID": "1", "CONTENT": "ok"}, {"REPO_ID": "1"}], "item 1: CONTENT is missing")]
        for body, reason in cases:
            status, answer = await post(self, server.private_url, body)
            self.assertEqual(status, 400)
            self.assertIn(reason, answer["error"])

    async def test_bad_batch_publishes_nothing(self):
        """One bad item refuses the whole batch: the good item is not delivered."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        await post(self, server.private_url, [{"REPO_ID": "1", "CONTENT": "lost"}, {"REPO_ID": 7.5}])
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "barrier"})
        self.assertEqual(await browser.next_message(), b"barrier")

    async def test_form_content_type_is_decoded_by_the_body(self):
        """A body sent as a form (curl -d, a multipart header) is decoded by its content;
        twisted.web does not parse it as a form first (a bad multipart body would be a bare 400)."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        for content_type in ("application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            status, body = await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": content_type},
                                      headers={"Content-Type": [content_type]})
            self.assertEqual((status, body), (200, {"published": 1}))
            self.assertEqual(await browser.next_message(), content_type.encode())

    async def test_other_methods_are_405(self):
        """GET, PUT and DELETE on the publish path get 405 with Allow: POST."""
        server = ServerFixture.start(self)
        for method in ("GET", "PUT", "DELETE"):
            status, _ = await request(self, method, server.private_url)
            self.assertEqual(status, 405)

    async def test_body_over_limit_is_413(self):
        """A body above private.max_body_size gets 413."""
        server = ServerFixture.start(self, private_max_body_size="1KiB")
        status, _ = await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "x" * 2000})
        self.assertEqual(status, 413)

    async def test_status_reports_connections_and_counters(self):
        """GET /status shows open connections, registrations and message counters."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "7", repos={"7": "r"})
        await post(self, server.private_url, {"REPO_ID": "7", "CONTENT": "x"})
        await browser.next_message()
        status, body = await request(self, "GET", server.private_url + "/status")
        self.assertEqual(status, 200)
        self.assertEqual(body["connections"], {"open": 1, "registered": {"7": 1}})
        self.assertEqual(body["messages"], {"received": 1, "delivered": 1, "refused": 0})
        self.assertGreaterEqual(body["uptime"], 0)
        self.assertEqual(len(body["collector"]["collections"]), 3)

    async def test_status_is_for_authorized_hosts_only(self):
        """GET /status from an unauthorized peer gets 403."""
        server = ServerFixture.start(self, private_authorized_hosts="10.0.0.0/8")
        status, _ = await request(self, "GET", server.private_url + "/status")
        self.assertEqual(status, 403)


class SocketOptionTests(unittest.TestCase):
    """Browser sockets are tuned for small, latency-sensitive pushes."""

    async def test_browser_socket_has_tcp_nodelay(self):
        """The server side of a browser connection sets TCP_NODELAY."""
        server = ServerFixture.start(self)
        await registered_browser(self, server, "1")
        [protocol] = server.service.browser_factory._open
        self.assertTrue(protocol.transport.getTcpNoDelay())


class InternalErrorTests(unittest.TestCase):
    """An unexpected failure while identifying a browser is a logged 500, not a crash."""

    async def test_unexpected_authentication_error_is_500(self):
        """With the key unavailable, the handshake gets 500 and the failure is logged."""
        server = ServerFixture.start(self)
        server.service.private_key = None
        request = ws_handshake(f"/public?token={token()}", server.public_port)
        self.assertEqual(await handshake_status(server.public_port, request), 500)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)


class ReferenceCycleTests(unittest.TestCase):
    """A closed browser connection is freed by reference counting, not left to the cycle
    collector, whose full passes would pause the server when many browsers churn."""

    async def test_closed_browser_protocol_leaves_no_cycle(self):
        """After close, nothing but retained log events refers to the server-side protocol."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1")
        [protocol] = server.service.browser_factory._open
        alive = weakref.ref(protocol)
        del protocol
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        await browser.close()
        await wait_until(lambda: not server.service.browser_factory._open)
        for _ in range(5):  # let callbacks scheduled by the close run
            await task.deferLater(reactor, 0.01, lambda: None)
        leftover = alive()
        if leftover is None:
            return
        # The tests never start twisted.logger's output, so its buffer keeps old events.
        # (A loop, not a comprehension: that would make `leftover` a cell of its own.)
        referrers = []
        for referrer in gc.get_referrers(leftover):
            if isinstance(referrer, dict) and referrer.get("log_source") is leftover:
                continue
            if not isinstance(referrer, (Logger, types.FrameType)):
                referrers.append(referrer)
        self.assertEqual(referrers, [])


class OpenConnectionStateTests(unittest.TestCase):
    """What an open browser connection keeps on the server."""

    async def test_open_connection_keeps_no_handshake_or_token(self):
        """Once open, the server-side protocol holds neither the request headers nor its token."""
        server = ServerFixture.start(self)
        browser_token = token("carol")
        browser = await connect_browser(self, f"ws://127.0.0.1:{server.public_port}/public?token={browser_token}",
                                        server.public_port, headers={"X-Custom": "header-value"})
        await wait_until(lambda: server.service.browser_factory._open)
        [protocol] = server.service.browser_factory._open
        kept = repr(vars(protocol))
        self.assertNotIn(browser_token, kept)
        self.assertNotIn("header-value", kept)
        await browser.close()

    async def test_connection_takes_the_factory_options(self):
        """A connection opens with the limits in force (ping, sizes), each as its own copy."""
        server = ServerFixture.start(self, limits_ping_interval="7", limits_max_message_size="2KiB")
        browser = await registered_browser(self, server, "1")
        [protocol] = server.service.browser_factory._open
        self.assertEqual((protocol.autoPingInterval, protocol.maxMessagePayloadSize), (7, 2048))
        self.assertIn("autoPingInterval", vars(protocol))
        await browser.close()
