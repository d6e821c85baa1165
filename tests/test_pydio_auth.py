"""Tests of pydio_ws.pydio_auth: registry parsing, and the exchange with a fake Pydio host."""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent
from twisted.web.iweb import IAgent
from zope.interface import implementer

from pydio_ws import __version__
from pydio_ws.auth import AuthError, HandshakeRequest, Identity
from pydio_ws.pydio_auth import (
    MAX_REPLY_BYTES,
    PydioAuthenticator,
    identity_from_registry,
    url_with_key,
)
from tests.fake_pydio import (
    ERROR_REPLY,
    GARBAGE_REPLY,
    CloseDelimitedPydio,
    FakePydio,
    Held,
    Reply,
    registry,
    unreachable_url,
)

KEY = "s3cret+key&more"
ALICE = "AjaXplorer=alice-session"
BOB = "AjaXplorer=bob-session"
ALICE_REGISTRY = registry("alice", "/sales", {"1": "rw", "2": None, "3": "w"})
ALICE_IDENTITY = Identity("alice", "/sales", {"1": "rw", "2": "r", "3": "w"})
NAMESPACE = "pydio_ws.pydio_auth.PydioAuthenticator"

DTD_REPLY = (
    b'<?xml version="1.0"?><!DOCTYPE tree [<!ENTITY who "alice">]>'
    b'<tree><user id="&who;"/></tree>'
)
EXTERNAL_ENTITY_REPLY = (
    b'<?xml version="1.0"?><!DOCTYPE tree [<!ENTITY who SYSTEM "file:///etc/passwd">]>'
    b'<tree><user id="&who;"/></tree>'
)

xml_text = st.text(
    st.characters(
        blacklist_categories=("Cs", "Cc"),
        blacklist_characters="\ufffe\uffff",
    )
)


def handshake(cookie=None, **headers) -> HandshakeRequest:
    """A browser handshake carrying `cookie` (if any) and other headers."""
    if cookie is not None:
        headers["cookie"] = cookie
    return HandshakeRequest("127.0.0.1", headers, {})


def call(authenticator, request) -> Deferred:
    return Deferred.fromCoroutine(authenticator.authenticate(request))


@implementer(IAgent)
class RecordingAgent:
    """The real Agent, noting each request at the moment it is sent."""

    def __init__(self):
        self._agent = Agent(reactor)
        self.uris = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        self.uris.append(uri)
        return self._agent.request(method, uri, headers, bodyProducer)


class RegistryTests(TestCase):
    """identity_from_registry and url_with_key, without a reactor."""

    def refused(self, body: bytes) -> AuthError:
        with self.assertRaises(AuthError) as caught:
            identity_from_registry(body)
        return caught.exception

    def test_registry_gives_user_group_and_repos(self):
        """A registry gives the user id, group path and each repo's acl, "r" by default."""
        self.assertEqual(identity_from_registry(ALICE_REGISTRY), ALICE_IDENTITY)

    def test_registry_without_declaration_is_read(self):
        """A registry without an XML declaration is read the same."""
        body = b'<tree><user id="bob"><repositories><repo id="9"/></repositories></user></tree>'
        self.assertEqual(identity_from_registry(body), Identity("bob", None, {"9": "r"}))

    def test_absent_or_empty_group_path_is_none(self):
        """An absent or empty groupPath gives no group path."""
        self.assertIsNone(identity_from_registry(registry("bob")).group_path)
        self.assertIsNone(identity_from_registry(registry("bob", "")).group_path)

    def test_error_message_refuses_401(self):
        """A message of type ERROR anywhere refuses with 401, even beside a user."""
        self.assertEqual(self.refused(ERROR_REPLY).status, 401)
        beside = ALICE_REGISTRY.replace(
            b"<preferences/>", b'<preferences><message type="ERROR">bad key</message>'
            b"</preferences>"
        )
        error = self.refused(beside)
        self.assertEqual((error.status, error.reason), (401, "Pydio refused the session: bad key"))

    def test_error_message_reason_is_one_bounded_line(self):
        """The host's error text is put on one line of bounded length in the reason."""
        body = b'<tree><message type="ERROR">a\r\nb' + b"x" * 500 + b"</message></tree>"
        reason = self.refused(body).reason
        self.assertNotIn("\n", reason)
        self.assertLess(len(reason), 300)

    def test_reply_without_user_refuses_401(self):
        """A registry without a user refuses with 401."""
        self.assertEqual(self.refused(b"<tree><preferences/></tree>").status, 401)

    def test_garbage_refuses_502(self):
        """A reply that is not XML refuses with 502."""
        self.assertEqual(self.refused(GARBAGE_REPLY).status, 502)
        self.assertEqual(self.refused(b"").status, 502)

    def test_dtd_or_entity_refuses_502(self):
        """A reply with a DTD (even without entities) or with entities refuses with 502."""
        self.assertEqual(self.refused(b'<!DOCTYPE tree><tree><user id="a"/></tree>').status, 502)
        self.assertEqual(self.refused(DTD_REPLY).status, 502)
        self.assertEqual(self.refused(EXTERNAL_ENTITY_REPLY).status, 502)
        self.assertEqual(self.refused(b'<tree><user id="&who;"/></tree>').status, 502)

    def test_other_shapes_refuse_502(self):
        """Another root, several users, a user or repo without id refuse with 502."""
        for body in (
            b'<html><user id="alice"/></html>',
            b'<tree><user id="alice"/><user id="bob"/></tree>',
            b'<tree><user groupPath="/"/></tree>',
            b'<tree><user id="alice"><repositories><repo acl="r"/></repositories></user></tree>',
        ):
            self.assertEqual(self.refused(body).status, 502, body)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_bytes_only_refuse(self, body):
        """Random bytes give an Identity or AuthError 401/502, never another exception."""
        try:
            identity_from_registry(body)
        except AuthError as error:
            self.assertIn(error.status, (401, 502))

    @settings(max_examples=300, deadline=None)
    @given(st.text(alphabet='<>/="\'?!&;[] \ntreusidpoyaclgmsEROAx', max_size=120))
    def test_xmlish_text_only_refuses(self, text):
        """XML-looking text gives an Identity or AuthError 401/502, never another exception."""
        try:
            identity_from_registry(text.encode("utf-8"))
        except AuthError as error:
            self.assertIn(error.status, (401, 502))

    @settings(max_examples=200, deadline=None)
    @given(
        xml_text.filter(bool),
        st.one_of(st.none(), xml_text),
        st.dictionaries(xml_text.filter(bool), st.one_of(st.none(), xml_text), max_size=5),
    )
    def test_any_registry_round_trips(self, user_id, group_path, repos):
        """Any user id, group path and repos written as a registry are read back."""
        expected = Identity(
            user_id, group_path or None,
            {repo: "r" if acl is None else acl for repo, acl in repos.items()},
        )
        self.assertEqual(identity_from_registry(registry(user_id, group_path, repos)), expected)

    def test_key_is_added_to_url_without_query(self):
        """The key becomes the query of a URL that has none."""
        self.assertEqual(url_with_key("http://h/ws_auth.php", "k"), b"http://h/ws_auth.php?key=k")

    def test_key_is_added_to_existing_query(self):
        """The key is appended to an existing query, replacing a key already there."""
        self.assertEqual(
            url_with_key("http://h/pydio/?get_action=ws_authenticate&key=old", "k"),
            b"http://h/pydio/?get_action=ws_authenticate&key=k",
        )

    def test_key_is_percent_encoded(self):
        """A key with "+", "&" or "#" is percent-encoded so PHP reads it back intact."""
        self.assertEqual(
            url_with_key("http://h/?a=1", "a+b&c#d"), b"http://h/?a=1&key=a%2Bb%26c%23d"
        )

    def test_bad_url_is_refused(self):
        """A pydio URL that is not http(s) with a host raises ValueError."""
        for url in ("ftp://host/", "http:///nohost", "pydio"):
            with self.assertRaises(ValueError):
                PydioAuthenticator(reactor, url, lambda: KEY)


class PydioAuthenticatorTests(TestCase):
    """PydioAuthenticator over real HTTP to a fake Pydio host on loopback."""

    # A broken exchange fails its test quickly instead of after trial's 120 s.
    timeout = 10

    async def fake_host(self) -> FakePydio:
        host = FakePydio(reactor)
        await host.start()
        self.addCleanup(host.stop)
        return host

    def authenticator(self, url, **options) -> PydioAuthenticator:
        options.setdefault("key_source", lambda: KEY)
        return PydioAuthenticator(reactor, url, **options)

    def capture_log(self) -> list:
        events = []

        def observe(event):
            if event.get("log_namespace") == NAMESPACE:
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    async def refused(self, authenticator, request) -> AuthError:
        return await self.assertFailure(call(authenticator, request), AuthError)

    async def test_session_identity_comes_from_the_host(self):
        """A session cookie the host knows gives that user's Identity."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(ALICE_REGISTRY)
        identity = await call(self.authenticator(host.url), handshake(ALICE))
        self.assertEqual(identity, ALICE_IDENTITY)

    async def test_key_is_added_to_a_url_with_a_query(self):
        """The key is sent beside the query already in the pydio URL."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(ALICE_REGISTRY)
        await call(self.authenticator(host.url), handshake(ALICE))
        [received] = host.received
        self.assertEqual(received.path, b"/pydio/")
        self.assertEqual(
            received.args,
            {b"get_action": [b"ws_authenticate"], b"key": [KEY.encode()]},
        )

    async def test_key_is_added_to_a_url_without_a_query(self):
        """The key alone becomes the query of a pydio URL without one."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(ALICE_REGISTRY)
        await call(self.authenticator(host.base_url), handshake(ALICE))
        self.assertEqual(host.received[0].args, {b"key": [KEY.encode()]})

    async def test_key_is_read_at_each_request(self):
        """The key comes from key_source at each request, so a reload takes effect."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(ALICE_REGISTRY)
        host.replies[BOB] = Reply(registry("bob"))
        keys = ["first"]
        authenticator = self.authenticator(host.url, key_source=lambda: keys[0])
        await call(authenticator, handshake(ALICE))
        keys[0] = "second"
        await call(authenticator, handshake(BOB))
        self.assertEqual([r.args[b"key"] for r in host.received], [[b"first"], [b"second"]])

    async def test_only_cookie_and_user_agent_are_forwarded(self):
        """Only the browser's Cookie is forwarded, with a User-Agent naming pydio-ws."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(ALICE_REGISTRY)
        request = handshake(
            ALICE, authorization="Bearer x", origin="http://evil", **{"x-forwarded-for": "1.2.3.4"}
        )
        await call(self.authenticator(host.url), request)
        [received] = host.received
        self.assertEqual(received.header(b"cookie"), ALICE.encode())
        self.assertEqual(received.header(b"user-agent"), f"pydio-ws/{__version__}".encode())
        self.assertLessEqual(
            set(received.headers), {b"host", b"connection", b"cookie", b"user-agent"}
        )

    async def test_missing_cookie_refuses_401_without_calling_the_host(self):
        """A handshake without Cookie header is refused with 401 and the host is not called."""
        host = await self.fake_host()
        error = await self.refused(self.authenticator(host.url), handshake(None))
        self.assertEqual((error.status, error.reason), (401, "no session cookie"))
        self.assertEqual(host.received, [])

    async def test_error_message_refuses_401(self):
        """The host's ERROR message (no session) refuses with 401."""
        host = await self.fake_host()
        error = await self.refused(self.authenticator(host.url), handshake("AjaXplorer=stale"))
        self.assertEqual(error.status, 401)
        self.assertIn("You must be logged in", error.reason)

    async def test_reply_without_user_refuses_401(self):
        """A registry without user refuses with 401."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(b"<tree><preferences/></tree>")
        error = await self.refused(self.authenticator(host.url), handshake(ALICE))
        self.assertEqual(error.status, 401)

    async def test_garbage_reply_refuses_502(self):
        """A reply that is not XML refuses with 502."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(GARBAGE_REPLY)
        error = await self.refused(self.authenticator(host.url), handshake(ALICE))
        self.assertEqual(error.status, 502)

    async def test_dtd_reply_refuses_502(self):
        """A reply with a DTD and entities refuses with 502."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(DTD_REPLY)
        error = await self.refused(self.authenticator(host.url), handshake(ALICE))
        self.assertEqual(error.status, 502)

    async def test_non_200_refuses_502_with_the_status(self):
        """A non-200 answer refuses with 502 and a reason naming the status."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(b"<html>oops</html>", code=500)
        error = await self.refused(self.authenticator(host.url), handshake(ALICE))
        self.assertEqual(error.status, 502)
        self.assertIn("HTTP 500", error.reason)

    async def test_oversized_reply_refuses_502(self):
        """A reply larger than MAX_REPLY_BYTES refuses with 502."""
        host = await self.fake_host()
        padding = b"<preferences/>" * (MAX_REPLY_BYTES // 14 + 1)
        host.replies[ALICE] = Reply(ALICE_REGISTRY.replace(b"<preferences/>", padding))
        host.replies[BOB] = Reply(
            ALICE_REGISTRY.replace(b"<preferences/>", padding), framing="chunked"
        )
        authenticator = self.authenticator(host.url)
        for cookie in (ALICE, BOB):
            error = await self.refused(authenticator, handshake(cookie))
            self.assertEqual(error.status, 502)
            self.assertIn("larger than", error.reason)

    async def test_unreachable_host_refuses_503_and_logs(self):
        """A host that refuses connections gives 503, logged without cookie or key."""
        events = self.capture_log()
        authenticator = self.authenticator(await unreachable_url(reactor))
        error = await self.refused(authenticator, handshake(ALICE))
        self.assertEqual(error.status, 503)
        [event] = events
        self.assertEqual((event["status"], event["reason"]), (503, error.reason))
        for text in (formatEvent(event), repr(event)):
            self.assertNotIn("alice-session", text)
            self.assertNotIn("s3cret", text)
            self.assertNotIn("s3cret".replace("+", "%2B"), text)

    async def test_silent_host_times_out_with_503(self):
        """A host that does not answer within the timeout gives 503."""
        host = await self.fake_host()
        host.replies[ALICE] = Held()
        clock = Clock()
        authenticator = self.authenticator(host.url, clock=clock, timeout=5)
        arrived = host.next_request()
        pending = call(authenticator, handshake(ALICE))
        await arrived
        clock.advance(4.9)
        self.assertFalse(pending.called)
        clock.advance(0.1)
        error = await self.assertFailure(pending, AuthError)
        self.assertEqual(error.status, 503)
        self.assertIn("within 5 s", error.reason)

    async def test_host_stalling_mid_body_times_out_with_503(self):
        """A host that stops in the middle of the body gives 503 at the timeout."""
        host = await self.fake_host()
        host.replies[ALICE] = Held(prefix=ALICE_REGISTRY[:40])
        clock = Clock()
        authenticator = self.authenticator(host.url, clock=clock, timeout=5)
        arrived = host.next_request()
        pending = call(authenticator, handshake(ALICE))
        await arrived
        clock.advance(5)
        self.assertEqual((await self.assertFailure(pending, AuthError)).status, 503)

    async def test_content_length_and_chunked_replies_are_complete(self):
        """Replies framed by Content-Length or chunked encoding are both read whole."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(ALICE_REGISTRY, framing="length")
        host.replies[BOB] = Reply(ALICE_REGISTRY, framing="chunked")
        authenticator = self.authenticator(host.url)
        self.assertEqual(await call(authenticator, handshake(ALICE)), ALICE_IDENTITY)
        self.assertEqual(await call(authenticator, handshake(BOB)), ALICE_IDENTITY)

    async def test_close_delimited_reply_is_complete(self):
        """An HTTP/1.0 reply without Content-Length, ended by closing, is read whole."""
        host = CloseDelimitedPydio(
            reactor, b"HTTP/1.0 200 OK\r\nContent-Type: text/xml\r\n\r\n" + ALICE_REGISTRY
        )
        await host.start()
        self.addCleanup(host.stop)
        identity = await call(self.authenticator(host.url), handshake(ALICE))
        self.assertEqual(identity, ALICE_IDENTITY)
        [head] = host.received
        self.assertIn(b"\r\nCookie: " + ALICE.encode() + b"\r\n", head)

    async def test_truncated_reply_refuses_502(self):
        """A reply closed before its Content-Length is reached refuses with 502."""
        host = CloseDelimitedPydio(
            reactor, b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + ALICE_REGISTRY
        )
        await host.start()
        self.addCleanup(host.stop)
        error = await self.refused(self.authenticator(host.url), handshake(ALICE))
        self.assertEqual(error.status, 502)
        self.assertIn("incomplete", error.reason)

    async def test_concurrent_same_cookie_share_one_request(self):
        """Concurrent handshakes with the same cookie share one request to the host."""
        host = await self.fake_host()
        held = host.replies[ALICE] = Held()
        authenticator = self.authenticator(host.url, cache_ttl=0)
        arrived = host.next_request()
        first = call(authenticator, handshake(ALICE))
        second = call(authenticator, handshake(ALICE))
        await arrived
        held.release(Reply(ALICE_REGISTRY))
        self.assertEqual(await first, ALICE_IDENTITY)
        self.assertEqual(await second, ALICE_IDENTITY)
        self.assertEqual(len(host.received), 1)

    async def test_shared_failure_reaches_every_caller(self):
        """A refusal of a shared request reaches every caller that shared it."""
        host = await self.fake_host()
        held = host.replies[ALICE] = Held()
        authenticator = self.authenticator(host.url)
        arrived = host.next_request()
        first = call(authenticator, handshake(ALICE))
        second = call(authenticator, handshake(ALICE))
        await arrived
        held.release(Reply(GARBAGE_REPLY))
        self.assertEqual((await self.assertFailure(first, AuthError)).status, 502)
        self.assertEqual((await self.assertFailure(second, AuthError)).status, 502)
        self.assertEqual(len(host.received), 1)

    async def test_cancelled_caller_leaves_the_shared_request(self):
        """A caller that gives up does not cancel the request others share."""
        host = await self.fake_host()
        held = host.replies[ALICE] = Held()
        authenticator = self.authenticator(host.url)
        arrived = host.next_request()
        gone = call(authenticator, handshake(ALICE))
        staying = call(authenticator, handshake(ALICE))
        await arrived
        gone.cancel()
        self.failureResultOf(gone)
        held.release(Reply(ALICE_REGISTRY))
        self.assertEqual(await staying, ALICE_IDENTITY)

    async def test_identity_is_cached_within_ttl(self):
        """A known cookie is answered from the cache for cache_ttl seconds, then asked again."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(ALICE_REGISTRY)
        clock = Clock()
        authenticator = self.authenticator(host.url, clock=clock, cache_ttl=10)
        await call(authenticator, handshake(ALICE))
        clock.advance(9.9)
        self.assertEqual(await call(authenticator, handshake(ALICE)), ALICE_IDENTITY)
        self.assertEqual(len(host.received), 1)
        clock.advance(0.1)
        self.assertEqual(await call(authenticator, handshake(ALICE)), ALICE_IDENTITY)
        self.assertEqual(len(host.received), 2)

    async def test_zero_ttl_disables_the_cache(self):
        """With cache_ttl 0 every handshake asks the host."""
        host = await self.fake_host()
        host.replies[ALICE] = Reply(ALICE_REGISTRY)
        authenticator = self.authenticator(host.url, clock=Clock(), cache_ttl=0)
        await call(authenticator, handshake(ALICE))
        await call(authenticator, handshake(ALICE))
        self.assertEqual(len(host.received), 2)

    async def test_refusals_are_not_cached(self):
        """A refused cookie is asked again at the next handshake."""
        host = await self.fake_host()
        authenticator = self.authenticator(host.url, clock=Clock())
        await self.refused(authenticator, handshake(ALICE))
        host.replies[ALICE] = Reply(ALICE_REGISTRY)
        self.assertEqual(await call(authenticator, handshake(ALICE)), ALICE_IDENTITY)

    async def test_cache_is_bounded(self):
        """Beyond cache_size identities the oldest is forgotten and asked again."""
        host = await self.fake_host()
        cookies = [f"AjaXplorer=user{n}" for n in range(3)]
        for n, cookie in enumerate(cookies):
            host.replies[cookie] = Reply(registry(f"user{n}"))
        authenticator = self.authenticator(host.url, clock=Clock(), cache_size=2)
        for cookie in cookies + cookies[2:0:-1]:
            await call(authenticator, handshake(cookie))
        self.assertEqual(len(host.received), 3)
        await call(authenticator, handshake(cookies[0]))
        self.assertEqual(len(host.received), 4)

    async def test_concurrent_requests_are_capped(self):
        """Beyond max_concurrent requests in flight, the next waits for one to finish."""
        host = await self.fake_host()
        held = host.replies[ALICE] = Held()
        host.replies[BOB] = Reply(registry("bob"))
        agent = RecordingAgent()
        authenticator = self.authenticator(host.url, max_concurrent=1, agent=agent)
        arrived = host.next_request()
        first = call(authenticator, handshake(ALICE))
        second = call(authenticator, handshake(BOB))
        await arrived
        self.assertEqual(len(agent.uris), 1)
        self.assertFalse(second.called)
        held.release(Reply(ALICE_REGISTRY))
        self.assertEqual(await first, ALICE_IDENTITY)
        self.assertEqual((await second).user_id, "bob")
        cookies = [received.header(b"cookie") for received in host.received]
        self.assertEqual(cookies, [ALICE.encode(), BOB.encode()])
