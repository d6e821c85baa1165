"""Tests for pydio_ws.redis_backend: URL, payload, backoff, and two nodes on a real redis-server."""

import hiredis
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pydio_ws.broker import Broker, MemoryBackend
from pydio_ws.config import ConfigError, load_config
from pydio_ws.messages import ALL_REPOS, Message
from pydio_ws.redis_backend import (BrokerUnavailable, Channels, RedisAddress, RedisBackend,
                                    decode_message, default_retry_policy, encode_message,
                                    make_backend, parse_redis_url, redact_url)
from tests.certs import make_test_certs
from tests.redis_server import start_redis
from tests.support import wait_until

QUICK_RETRY = 0.05
WAIT_POLLS = 2000  # wait_until polls every 5 ms: 10 s at most


class LogCapture:
    """Collects log events emitted during a test."""

    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def errors(self, **fields):
        """Error-level events whose fields include `fields`."""
        return [event for event in self.events
                if event.get("log_level") is not None and event["log_level"].name == "error"
                and all(event.get(name) == value for name, value in fields.items())]


class RefusingEndpoint:
    """A client endpoint whose server is down: every attempt is refused (counted)."""

    def __init__(self):
        self.attempts = 0

    def connect(self, factory):
        self.attempts += 1
        return defer.fail(ConnectionRefusedError())


class SilentRedis:
    """An endpoint to an in-memory Redis that answers PING and SUBSCRIBE but never PUBLISH."""

    def __init__(self):
        self.connections = []

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransportWithDisconnection()
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport, hiredis.Reader()))
        return defer.succeed(protocol)

    def answer(self) -> list:
        """Answer the commands sent so far; returns the unanswered (PUBLISH) ones."""
        unanswered = []
        while any(transport.value() for _, transport, _ in self.connections):
            for protocol, transport, reader in self.connections:
                reader.feed(transport.value())
                transport.clear()
                command = reader.gets()
                while command is not False:
                    if command[0] == b"PING":
                        protocol.dataReceived(b"+PONG\r\n")
                    elif command[0] == b"SUBSCRIBE":
                        channel = command[1]
                        protocol.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$%d\r\n%s\r\n:1\r\n"
                                              % (len(channel), channel))
                    else:
                        unanswered.append(command)
                    command = reader.gets()
        return unanswered


# -- the URL -----------------------------------------------------------------------------

class RedisURLTests(unittest.TestCase):
    """parse_redis_url and the broker.url key."""

    def test_full_url(self):
        """Host, port, database and password are read from a redis:// URL."""
        address = parse_redis_url("redis://:s%40cret@redis.example:6380/3")
        self.assertEqual((address.host, address.port, address.db, address.tls, address.username,
                          address.password), ("redis.example", 6380, 3, False, None, "s@cret"))

    def test_defaults(self):
        """Port 6379 and database 0 are the defaults."""
        self.assertEqual(parse_redis_url("redis://localhost"), RedisAddress("localhost"))
        self.assertEqual(parse_redis_url("redis://localhost/").db, 0)

    def test_user_and_password(self):
        """redis://user:password@host gives an ACL user name."""
        address = parse_redis_url("redis://pydio:pw@127.0.0.1/1")
        self.assertEqual((address.username, address.password, address.db), ("pydio", "pw", 1))

    def test_rediss_with_ca_file(self):
        """rediss:// turns TLS on and ssl_ca_certs names the CA file."""
        certs = make_test_certs(self)
        address = parse_redis_url(f"rediss://[::1]:6390/0?ssl_ca_certs={certs.ca}")
        self.assertEqual((address.host, address.port, address.tls, address.ca_file),
                         ("::1", 6390, True, certs.ca))
        self.assertEqual(address.display, "rediss://[::1]:6390/0")

    def test_refusals(self):
        """Each malformed URL is refused with its precise reason."""
        for url, reason in [
            ("http://localhost", "expected redis:// or rediss://"),
            ("redis://", "missing host"),
            ("redis://localhost:0", "port must be 1-65535"),
            ("redis://localhost:99999", "expected redis://"),
            ("redis://localhost/x", "database must be a number"),
            ("redis://localhost/1/2", "database must be a number"),
            ("redis://localhost/1#top", "fragment"),
            ("redis://localhost/1?db=2", "unknown parameter 'db'"),
            ("redis://localhost/1?ssl_ca_certs=/etc/hosts", "needs a rediss:// URL"),
            ("rediss://localhost/1?ssl_ca_certs=/nonexistent/ca.pem", "cannot read file"),
            ("redis://user@localhost", "a user name needs a password"),
        ]:
            with self.assertRaises(ValueError, msg=url) as caught:
                parse_redis_url(url)
            self.assertIn(reason, str(caught.exception), url)

    @given(password=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=12),
           tail=st.sampled_from(["/x", ":0", "#f", "?q=1", "/1/2", ":port"]))
    def test_reason_never_shows_the_password(self, password, tail):
        """A refused URL's reason names the URL with its password hidden."""
        url = f"redis://:{password}@localhost{tail}"
        with self.assertRaises(ValueError) as caught:
            parse_redis_url(url)
        self.assertNotIn(password, str(caught.exception))

    @given(host=st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
           port=st.integers(1, 65535), db=st.integers(0, 10 ** 6),
           password=st.none() | st.text(min_size=1),
           user=st.none() | st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1))
    def test_round_trip(self, host, port, db, password, user):
        """Every URL built from valid parts parses back into those parts."""
        from urllib.parse import quote
        credentials = "" if password is None else f"{quote(user or '', safe='')}:{quote(password, safe='')}@"
        address = parse_redis_url(f"redis://{credentials}{host}:{port}/{db}")
        self.assertEqual((address.host, address.port, address.db, address.password, address.username),
                         (host, port, db, password, user if password is not None else None))

    @given(st.text())
    def test_any_text_parses_or_is_refused(self, text):
        """Arbitrary text either parses or raises ValueError, never anything else."""
        try:
            parse_redis_url(text)
        except ValueError:
            pass

    def test_redact(self):
        """redact_url hides what precedes '@' in the authority."""
        self.assertEqual(redact_url("redis://u:p@h:1/0"), "redis://***@h:1/0")
        self.assertEqual(redact_url("redis://h:1/0"), "redis://h:1/0")

    def test_broker_url_key(self):
        """broker.url accepts memory://, redis:// and rediss://, and refuses others by name."""
        for url in ("memory://", "redis://127.0.0.1:6379/0", "rediss://:pw@redis.example/2"):
            self.assertEqual(load_config(environ={}, overrides={("broker", "url"): url}).broker.url, url)
        with self.assertRaises(ConfigError) as caught:
            load_config(environ={}, overrides={("broker", "url"): "redis://:hunter2hunter2@h/x"})
        self.assertIn("broker.url", str(caught.exception))
        self.assertNotIn("hunter2hunter2", str(caught.exception))
        with self.assertRaises(ConfigError):
            load_config(environ={}, overrides={("broker", "url"): "amqp://h"})

    def test_make_backend(self):
        """make_backend builds the memory backend or a Redis backend for the configured URL."""
        memory = load_config(environ={}, overrides={("broker", "url"): "memory://"})
        self.assertIsInstance(make_backend(memory, reactor), MemoryBackend)
        redis = load_config(environ={}, overrides={("broker", "url"): "redis://:pw@127.0.0.1:7000/4"})
        backend = make_backend(redis, reactor)
        self.assertIsInstance(backend, RedisBackend)
        self.assertEqual((backend.address.port, backend.address.db, backend.state), (7000, 4, "stopped"))


# -- payload and channels ----------------------------------------------------------------

messages = st.builds(Message, repo_id=st.text(min_size=1), content=st.text(),
                     user_id=st.none() | st.text(), group_path=st.none() | st.text(),
                     node_paths=st.lists(st.text()).map(tuple))


class PayloadTests(unittest.TestCase):
    """The JSON payload published to Redis, and the channel names."""

    @given(messages)
    def test_round_trip(self, message):
        """Every message, any text included, comes back equal from its payload."""
        payload = encode_message(message)
        payload.encode("ascii")
        self.assertEqual(decode_message(payload), message)

    def test_compact(self):
        """Optional fields that are not set are left out of the payload."""
        self.assertEqual(encode_message(Message("1", "<x/>")), '{"r":"1","c":"<x/>"}')

    def test_bad_payloads(self):
        """Payloads that are not a message are refused with ValueError."""
        for payload in ('[]', '{"c":"x"}', '{"r":1,"c":"x"}', '{"r":"1","c":"x","n":"p"}',
                        '{"r":"1","c":"x","u":2}', 'not json'):
            with self.assertRaises(ValueError, msg=payload):
                decode_message(payload)

    @given(st.text(min_size=1), st.text(min_size=1))
    def test_channels(self, one, other):
        """Each workspace has its own channel, distinct from the all-workspaces channel."""
        channels = Channels("pydio-ws:0")
        self.assertEqual(channels.for_repo(ALL_REPOS), channels.all)
        if one != ALL_REPOS:
            self.assertNotEqual(channels.for_repo(one), channels.all)
        self.assertEqual(channels.for_repo(one) == channels.for_repo(other), one == other)

    def test_database_separates_deployments(self):
        """Two databases of one server use different channels (pub/sub ignores the database)."""
        zero = RedisBackend(reactor, RedisAddress("h", db=0))._channels
        one = RedisBackend(reactor, RedisAddress("h", db=1))._channels
        self.assertNotEqual(zero.for_repo("1"), one.for_repo("1"))


# -- backoff, on a clock -----------------------------------------------------------------

class BackoffTests(unittest.TestCase):
    """Redis unreachable at startup, with time driven by a Clock."""

    async def test_unreachable_at_start(self):
        """An unreachable Redis: "connecting", an error per attempt, retries on the backoff, stop cancels."""
        logs = LogCapture(self)
        clock, endpoint = Clock(), RefusingEndpoint()
        delays = {1: 1.0, 2: 2.0}
        backend = RedisBackend(clock, RedisAddress("127.0.0.1", 7777), endpoint=endpoint,
                               retry_policy=lambda attempt: delays.get(attempt, 4.0))
        backend.start(lambda message: 0)
        self.assertEqual((backend.state, endpoint.attempts), ("connecting", 2))
        failures = logs.errors(address="redis://127.0.0.1:7777/0", attempt=1)
        self.assertEqual(sorted(event["link"] for event in failures), ["publish", "subscribe"])
        self.assertIn("refused", failures[0]["reason"])
        self.assertEqual(failures[0]["delay"], 1.0)
        clock.advance(0.999)
        self.assertEqual(endpoint.attempts, 2)
        clock.advance(0.001)
        self.assertEqual(endpoint.attempts, 4)
        clock.advance(2.0)
        self.assertEqual(endpoint.attempts, 6)
        clock.advance(3.999)
        self.assertEqual(endpoint.attempts, 6)
        error = await self.assertFailure(backend.publish([Message("1", "x")]), BrokerUnavailable)
        self.assertIn("connecting", str(error))
        await backend.stop()
        self.assertEqual((clock.getDelayedCalls(), backend.state), ([], "stopped"))

    async def test_publish_without_answer_times_out(self):
        """A PUBLISH Redis does not answer fails after the timeout and the connection is dropped."""
        clock, redis = Clock(), SilentRedis()
        backend = RedisBackend(clock, RedisAddress("127.0.0.1"), endpoint=redis, timeout=5.0,
                               retry_policy=lambda attempt: 1.0)
        backend.start(lambda message: 0)
        redis.answer()
        self.assertEqual(backend.state, "up")
        publishing = backend.publish([Message("1", "x")])
        self.assertEqual(redis.answer(), [[b"PUBLISH", b"pydio-ws:0:repo:1", b'{"r":"1","c":"x"}']])
        clock.advance(4.9)
        self.assertNoResult(publishing)
        clock.advance(0.1)
        error = self.failureResultOf(publishing, BrokerUnavailable).value
        self.assertIn("no answer in time", str(error))
        self.assertEqual(backend.state, "down")
        await backend.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_default_policy_grows_to_a_cap(self):
        """The default backoff starts under a second, doubles, and stays near 30 s."""
        policy = default_retry_policy()
        delays = [policy(attempt) for attempt in range(1, 12)]
        self.assertLess(delays[0], 1.0)
        self.assertTrue(all(later > earlier for earlier, later in zip(delays[:5], delays[1:6])))
        self.assertTrue(all(30.0 <= delay <= 30.25 for delay in delays[7:]))


# -- two nodes on a real redis-server ----------------------------------------------------

class Node:
    """One backend ("node") whose deliver callable queues what Redis hands it."""

    def __init__(self, testcase, url: str, retry=QUICK_RETRY):
        self.inbox = defer.DeferredQueue()
        self.backend = RedisBackend(reactor, parse_redis_url(url), retry_policy=lambda attempt: retry)
        self.backend.start(self.deliver)
        testcase.addCleanup(self.backend.stop)

    def deliver(self, message):
        self.inbox.put(message)
        return 1

    async def next(self) -> Message:
        return await self.inbox.get().addTimeout(10, reactor)

    async def up(self):
        await wait_until(lambda: self.backend.state == "up", polls=WAIT_POLLS)

    async def interested(self, repo_id: str):
        """Subscribe to `repo_id` and wait for Redis to confirm it."""
        self.backend.interest_changed(repo_id, True)
        await wait_until(lambda: repo_id in self.backend.subscribed_repos, polls=WAIT_POLLS)

    def publish(self, *messages) -> defer.Deferred:
        return self.backend.publish(messages)


async def two_nodes(testcase, url: str):
    nodes = Node(testcase, url), Node(testcase, url)
    for node in nodes:
        await node.up()
    return nodes


class TwoNodeTests(unittest.TestCase):
    """Delivery across nodes joined by one redis-server."""

    def setUp(self):
        self.redis = start_redis(self)

    async def test_message_reaches_the_other_node(self):
        """A message published on node A is handed to node B's deliver callable, fields intact."""
        a, b = await two_nodes(self, self.redis.url)
        await b.interested("1")
        message = Message("1", "<tree/>", user_id="alice", group_path="/sales", node_paths=("/a", "/b"))
        self.assertEqual(await a.publish(message), 1)
        self.assertEqual(await b.next(), message)

    async def test_publishing_node_delivers_its_own_message_once(self):
        """The publishing node gets its own message back from Redis once, like every node."""
        a, b = await two_nodes(self, self.redis.url)
        await a.interested("1")
        await a.publish(Message("1", "first"))
        await a.publish(Message(ALL_REPOS, "second"))
        self.assertEqual([(await a.next()).content, (await a.next()).content], ["first", "second"])
        self.assertEqual(len(a.inbox.pending), 0)

    async def test_only_interesting_workspaces_arrive(self):
        """A node not interested in workspace 2 gets nothing for it; the barrier proves it."""
        a, b = await two_nodes(self, self.redis.url)
        await b.interested("1")
        await a.publish(Message("2", "not-here"), Message("1", "barrier"))
        self.assertEqual((await b.next()).content, "barrier")
        self.assertEqual(b.backend.subscribed_repos, {"1"})

    async def test_all_workspaces_reach_every_node(self):
        """A node with no interest at all still gets messages for all workspaces."""
        a, b = await two_nodes(self, self.redis.url)
        await a.publish(Message(ALL_REPOS, "everyone"))
        self.assertEqual((await b.next()).content, "everyone")

    async def test_lost_interest_unsubscribes(self):
        """After its last local interest goes, a workspace's messages stop arriving."""
        a, b = await two_nodes(self, self.redis.url)
        await b.interested("1")
        b.backend.interest_changed("1", False)
        await a.publish(Message(ALL_REPOS, "sync"))  # UNSUBSCRIBE was sent before this
        self.assertEqual((await b.next()).content, "sync")
        await a.publish(Message("1", "gone"), Message(ALL_REPOS, "barrier"))
        self.assertEqual((await b.next()).content, "barrier")

    async def test_publish_order_across_channels(self):
        """Messages to a workspace and to all workspaces arrive in publish order, batches too."""
        a, b = await two_nodes(self, self.redis.url)
        await b.interested("1")
        sent = [Message("1" if index % 3 else ALL_REPOS, f"m{index}") for index in range(60)]
        publishing = [a.backend.publish(sent[index:index + 4]) for index in range(0, 60, 4)]
        self.assertEqual(await defer.gatherResults(publishing), [4] * 15)
        self.assertEqual([(await b.next()).content for _ in sent], [m.content for m in sent])

    async def test_registration_changes_keep_registered_connections(self):
        """With a real Broker, registrations coming and going never cut off one that stays."""
        a, _ = await two_nodes(self, self.redis.url)
        backend = RedisBackend(reactor, parse_redis_url(self.redis.url),
                               retry_policy=lambda attempt: QUICK_RETRY)
        broker = Broker(lambda message: message.content, backend=backend)
        broker.start()
        self.addCleanup(broker.stop)
        await wait_until(lambda: backend.state == "up", polls=WAIT_POLLS)
        stays, passes = [], []
        broker.attach("alice", None, stays.append).register("1")
        await wait_until(lambda: "1" in backend.subscribed_repos, polls=WAIT_POLLS)
        passing = broker.attach("bob", None, passes.append)
        for _ in range(3):
            passing.register("1")
            passing.register("2")
            passing.unregister()
        passing.detach()
        await a.publish(Message("1", "still-here"))
        await wait_until(lambda: stays == ["still-here"], polls=WAIT_POLLS)
        self.assertEqual(backend.subscribed_repos, {"1"})


class FaultTests(unittest.TestCase):
    """Redis stopped and restarted under running nodes, down at start, refusing the password."""

    async def test_redis_lost_then_back(self):
        """Redis lost: publish fails and state is down; back: up again, deliveries resume."""
        logs = LogCapture(self)
        redis = start_redis(self)
        a, b = await two_nodes(self, redis.url)
        await b.interested("1")
        redis.stop()
        await wait_until(lambda: a.backend.state == b.backend.state == "down", polls=WAIT_POLLS)
        await self.assertFailure(a.publish(Message("1", "lost")), BrokerUnavailable)
        self.assertTrue(logs.errors(link="subscribe", address=f"redis://127.0.0.1:{redis.port}/0"))
        redis.start()
        await a.up()
        await b.up()
        self.assertEqual(b.backend.subscribed_repos, {"1"})
        await a.publish(Message("2", "skipped"), Message("1", "back"))
        self.assertEqual((await b.next()).content, "back")

    async def test_down_at_start(self):
        """Redis down at start: "connecting" and a clear error; up once redis-server starts."""
        logs = LogCapture(self)
        redis = start_redis(self, start=False)
        node = Node(self, redis.url)
        await wait_until(lambda: logs.errors(link="publish"), polls=WAIT_POLLS)
        self.assertEqual(node.backend.state, "connecting")
        self.assertIn("refused", logs.errors(link="publish")[0]["reason"])
        await self.assertFailure(node.publish(Message(ALL_REPOS, "early")), BrokerUnavailable)
        redis.start()
        await node.up()
        await node.publish(Message(ALL_REPOS, "on-time"))
        self.assertEqual((await node.next()).content, "on-time")

    async def test_password(self):
        """A wrong password keeps the node connecting with Redis's refusal logged; the right one works."""
        logs = LogCapture(self)
        redis = start_redis(self, "--requirepass", "right-password")
        wrong = Node(self, f"redis://:wrong-password@127.0.0.1:{redis.port}/0")
        await wait_until(lambda: logs.errors(link="subscribe"), polls=WAIT_POLLS)
        self.assertEqual(wrong.backend.state, "connecting")
        self.assertIn("WRONGPASS", logs.errors(link="subscribe")[0]["reason"])
        self.assertNotIn("wrong-password", repr(logs.events))
        right = Node(self, f"redis://:right-password@127.0.0.1:{redis.port}/5")
        await right.up()
        await right.publish(Message(ALL_REPOS, "authenticated"))
        self.assertEqual((await right.next()).content, "authenticated")

    async def test_rediss(self):
        """rediss:// works with the server's CA, and an untrusted certificate is a logged error."""
        logs = LogCapture(self)
        certs = make_test_certs(self)
        redis = start_redis(self, "--tls-cert-file", certs.server_cert, "--tls-key-file",
                            certs.server_key, "--tls-ca-cert-file", certs.ca,
                            "--tls-auth-clients", "no", tls=True)
        untrusted = Node(self, redis.url)
        trusted = Node(self, f"{redis.url}?ssl_ca_certs={certs.ca}")
        await trusted.up()
        await trusted.publish(Message(ALL_REPOS, "secret"))
        self.assertEqual((await trusted.next()).content, "secret")
        await wait_until(lambda: logs.errors(link="publish", address=f"rediss://127.0.0.1:{redis.port}/0"),
                         polls=WAIT_POLLS)
        self.assertEqual(untrusted.backend.state, "connecting")
        self.assertIn("certificate verify failed", logs.errors(link="publish")[0]["reason"])
