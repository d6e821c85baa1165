"""The Redis broker backend: several pydio-ws nodes joined by Redis pub/sub.

`[broker] url = redis://[[user]:password@]host[:port][/db]`, or `rediss://` for TLS
(the server certificate is checked against the system trust store, or against the CA
certificates of `?ssl_ca_certs=/path/ca.pem`). `make_backend(config, reactor)` turns the
configured URL into the backend the `Broker` publishes through.

Client: txredisapi, Twisted-native and maintained, with hiredis (C) as its reply parser.
redis-py's asyncio client would need Twisted's asyncio reactor for the whole process
(`twistd -r asyncio`, and every test), for two commands (PUBLISH, SUBSCRIBE). Only
txredisapi's protocols are used: its connection factories call the global reactor and
reconnect on their own, so the connections, timeouts and backoff here are ours, on the
injected reactor.

Wire, per node: one *publish* connection and one *subscribe* connection. Channels are
`pydio-ws:<db>:all` for messages to every workspace and `pydio-ws:<db>:repo:<id>` per
workspace (Redis pub/sub ignores the database number, so the channels carry it: two
deployments on two databases of one server stay apart). A message for a user or a group
goes to its workspace's channel; recipients are chosen locally by the broker's index. The
payload is compact JSON: `{"r": repo, "c": content, "u": user, "g": group, "n": [paths]}`,
optional fields left out.

A node is always subscribed to the all-workspaces channel, and to a workspace's channel
while at least one of its connections is registered there (`interest_changed`), so Redis
traffic grows with interest, not with the cluster. A channel is subscribed once, when its
first local connection registers, and unsubscribed only when its last one leaves: a
connection that was registered never sees its channel dropped under it.

Order and exactly once: a node publishes over its single publish connection, so Redis
executes its PUBLISH commands in the order they were accepted; a node receives over its
single subscribe connection, on which Redis sends messages in the order it executed the
PUBLISHes, whatever their channels. So m1 to workspace 1 then m2 to all workspaces reach
a connection registered on workspace 1 as m1, m2. Each message goes to exactly one
channel and a node delivers only what comes back from Redis (its own messages included,
never directly), so each matching connection gets it once.

Faults: the backend is "connecting" until both connections are up and the subscribe
connection has resubscribed, "up" then, "down" after a loss, "stopped" after `stop()`.
Only while "up" is a publish accepted; otherwise it fails (`BrokerUnavailable`, and the
publisher gets a 503), so nothing is dropped silently. Failed attempts are logged as
errors with the reason and retried with exponential backoff; a reconnected subscribe
connection resubscribes to the interest of that moment (Redis also drops a subscriber
that falls too far behind, see `client-output-buffer-limit pubsub`: the same path). Pub/sub
keeps nothing: a message another node publishes while this one resubscribes is not seen here.
"""

import json
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.internet import backoffPolicy
from twisted.internet import defer, endpoints, task
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from pydio_ws.broker import MemoryBackend
from pydio_ws.config import ConfigError
from pydio_ws.messages import ALL_REPOS, Message
from pydio_ws.tls import TLSError, client_tls_policy

DEFAULT_PORT = 6379
CHANNEL_PREFIX = "pydio-ws"
TIMEOUT = 5.0
STABLE_SECONDS = 5.0


class BrokerUnavailable(Exception):
    """Redis cannot take a message now; the publisher is answered 503."""


# -- the URL --------------------------------------------------------------------------

@dataclass(frozen=True)
class RedisAddress:
    """Where the Redis server is and how to log in; `display` never shows the password."""

    host: str
    port: int = DEFAULT_PORT
    db: int = 0
    tls: bool = False
    username: Optional[str] = field(default=None, repr=False)
    password: Optional[str] = field(default=None, repr=False)
    ca_file: str = ""

    @property
    def display(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


def redact_url(raw: str) -> str:
    """`raw` with the password (or anything before '@') replaced by ***, for messages."""
    scheme, separator, rest = raw.strip().partition("://")
    if not separator:
        return raw.strip()
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}://{authority}{slash}{path}"


def parse_redis_url(raw: str) -> RedisAddress:
    """Parse redis://[[user]:password@]host[:port][/db] or rediss://...[?ssl_ca_certs=FILE].

    Raises ValueError with the reason; the reason never contains the password.
    """
    shown = redact_url(raw)
    try:
        parts = urlsplit(raw.strip())
        port = parts.port
    except ValueError:
        raise ValueError(f"expected redis://[:password@]host[:port][/db], got {shown!r}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"expected redis:// or rediss://, got {shown!r}")
    if not parts.hostname:
        raise ValueError(f"missing host in {shown!r}")
    if port == 0:
        raise ValueError(f"port must be 1-65535 in {shown!r}")
    database = parts.path.strip("/") or "0"
    if not (database.isascii() and database.isdigit()):
        raise ValueError(f"database must be a number (the path /<db>), got {shown!r}")
    if parts.fragment:
        raise ValueError(f"unexpected #fragment in {shown!r}")
    try:
        query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ValueError(f"malformed query in {shown!r}") from None
    unknown = sorted(set(query) - {"ssl_ca_certs"})
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r} in {shown!r} (known: ssl_ca_certs)")
    ca_file = query.get("ssl_ca_certs", [""])[-1]
    if ca_file and parts.scheme != "rediss":
        raise ValueError("ssl_ca_certs needs a rediss:// URL")
    if ca_file and not os.access(ca_file, os.R_OK):
        raise ValueError(f"cannot read file {ca_file!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username and not password:
        raise ValueError(f"a user name needs a password (redis://user:password@host) in {shown!r}")
    return RedisAddress(host=parts.hostname, port=port or DEFAULT_PORT, db=int(database),
                        tls=parts.scheme == "rediss", username=username,
                        password=password or None, ca_file=ca_file)


def make_backend(config, reactor):
    """The broker backend for `config.broker.url`: MemoryBackend or RedisBackend."""
    url = config.broker.url
    if urlsplit(url).scheme == "memory":
        return MemoryBackend()
    return RedisBackend(reactor, parse_redis_url(url))


def redis_endpoint(reactor, address: RedisAddress, timeout: float = TIMEOUT):
    """The client endpoint of `address`: TCP, wrapped in verified TLS for rediss://."""
    endpoint = endpoints.HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    if not address.tls:
        return endpoint
    try:
        policy = client_tls_policy(True, address.ca_file)
    except TLSError as error:
        raise ConfigError(f"broker.url: {error}") from None
    return endpoints.wrapClientTLS(policy.creatorForNetloc(address.host.encode("idna"), address.port),
                                   endpoint)


# -- messages and channels ------------------------------------------------------------

def encode_message(message: Message) -> str:
    """The compact JSON payload of `message` (ASCII, so any str survives, lone surrogates too)."""
    fields = {"r": message.repo_id, "c": message.content}
    if message.user_id is not None:
        fields["u"] = message.user_id
    if message.group_path is not None:
        fields["g"] = message.group_path
    if message.node_paths:
        fields["n"] = list(message.node_paths)
    return json.dumps(fields, separators=(",", ":"))


def _text(fields: dict, name: str, required: bool = False) -> Optional[str]:
    value = fields.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(f"field {name!r} must be a string")
    return value


def decode_message(payload) -> Message:
    """The Message of a payload made by `encode_message`; ValueError if it is not one."""
    fields = json.loads(payload)
    if not isinstance(fields, dict):
        raise ValueError("payload is not a JSON object")
    node_paths = fields.get("n", [])
    if not isinstance(node_paths, list) or not all(isinstance(p, str) for p in node_paths):
        raise ValueError("field 'n' must be a list of strings")
    return Message(repo_id=_text(fields, "r", True), content=_text(fields, "c", True),
                   user_id=_text(fields, "u"), group_path=_text(fields, "g"),
                   node_paths=tuple(node_paths))


class Channels:
    """Channel names (bytes) of one deployment: one for all workspaces, one per workspace."""

    def __init__(self, prefix: str):
        self._prefix = prefix.encode("utf-8")
        self.all = self._prefix + b":all"

    def for_repo(self, repo_id: str) -> bytes:
        if repo_id == ALL_REPOS:
            return self.all
        # surrogatepass: a workspace id from JSON may hold a lone surrogate; it must still
        # name the same channel on the publishing and the subscribing side.
        return self._prefix + b":repo:" + repo_id.encode("utf-8", "surrogatepass")


# -- connections ----------------------------------------------------------------------

class _Connection(txredisapi.HiredisProtocol):
    """A txredisapi connection that reports its loss: `lost` fires, `lost_reason` says why."""

    def __init__(self):
        super().__init__(charset="utf-8", convertNumbers=False)
        self.lost = defer.Deferred()
        self.lost_reason = None
        self.on_lost: Callable[["_Connection"], None] = lambda connection: None

    def connectionLost(self, reason):
        self.lost_reason = reason
        try:
            super().connectionLost(reason)
        finally:
            self.on_lost(self)
            self.lost.callback(None)


class _SubscriberConnection(_Connection):
    """A subscribe connection: published messages go to `on_message`, replies to commands.

    Every (UN)SUBSCRIBE here names one channel, so its one confirmation answers it.
    """

    def __init__(self, on_message: Callable[[object, object], None]):
        super().__init__()
        self._on_message = on_message

    def replyReceived(self, reply):
        if isinstance(reply, list) and len(reply) == 3 and reply[0] == "message":
            self._on_message(reply[1], reply[2])
        else:
            self.replyQueue.put(reply)


class _ConnectionFactory(Factory):
    """Builds connections whose (rare) timers use the injected reactor."""

    noisy = False

    def __init__(self, reactor, make: Callable[[], _Connection]):
        self._reactor = reactor
        self._make = make

    def buildProtocol(self, addr):
        connection = self._make()
        connection.factory = self
        connection.callLater = self._reactor.callLater
        return connection


def _command(connection: _Connection, reactor, timeout: float, *args):
    """Send one command; the Deferred fails on an error reply, a lost connection or timeout."""
    return defer.maybeDeferred(connection.execute_command, *args).addTimeout(timeout, reactor)


class _Link:
    """One Redis connection kept open: connect, prepare, wait for the loss, retry with backoff.

    `ready` is the prepared connection, or None; the backend's `link_changed()` is called
    whenever it changes.
    """

    _log = Logger()

    def __init__(self, name: str, backend: "RedisBackend", factory, prepare):
        self.name = name
        self.ready: Optional[_Connection] = None
        self._backend = backend
        self._factory = factory
        self._prepare = prepare
        self._stopping = False
        self._current: Optional[defer.Deferred] = None
        self._done: Optional[defer.Deferred] = None

    def start(self) -> None:
        self._done = defer.Deferred.fromCoroutine(self._run())
        self._done.addErrback(lambda failure: self._log.failure(
            "redis {link} connection loop failed", failure, link=self.name))

    def stop(self) -> defer.Deferred:
        """Stop retrying, close the connection; fires when it is really closed."""
        self._stopping = True
        if self._current is not None:
            self._current.cancel()
        if self.ready is not None:
            self.ready.transport.loseConnection()
        if self._done is None:
            return defer.succeed(None)
        stopped = defer.Deferred()
        self._done.addBoth(lambda _: stopped.callback(None))
        return stopped

    async def _track(self, waiting: defer.Deferred):
        """Await `waiting`; stop() cancels it."""
        self._current = waiting
        try:
            return await waiting
        finally:
            self._current = None

    async def _run(self) -> None:
        backend = self._backend
        failures = 0
        while not self._stopping:
            try:
                connection = await self._connect()
            except Exception as error:
                if self._stopping:
                    return
                failures += 1
                delay = backend.retry_policy(failures)
                self._log.error(
                    "cannot reach the Redis broker at {address} ({link} connection): {reason}; "
                    "retry {attempt} in {delay:.2f}s", address=backend.address.display,
                    link=self.name, reason=_reason(error), attempt=failures, delay=delay)
            else:
                up_since = backend.reactor.seconds()
                self.ready = connection
                backend.link_changed()
                await connection.lost
                self.ready = None
                backend.link_changed()
                if self._stopping:
                    return
                # A connection that did not stay up counts as a failed attempt, so a server
                # that accepts and then drops connections is not hammered.
                stable = backend.reactor.seconds() - up_since >= STABLE_SECONDS
                failures = 0 if stable else failures + 1
                delay = backend.retry_policy(failures) if failures else 0.0
                self._log.error(
                    "lost the Redis broker at {address} ({link} connection): {reason}; "
                    "reconnecting in {delay:.2f}s", address=backend.address.display,
                    link=self.name, reason=connection.lost_reason.getErrorMessage(), delay=delay)
            if delay:
                try:
                    await self._track(task.deferLater(backend.reactor, delay, lambda: None))
                except defer.CancelledError:
                    return

    async def _connect(self) -> _Connection:
        backend = self._backend
        connection = await self._track(backend.endpoint.connect(self._factory))
        try:
            preparing = defer.Deferred.fromCoroutine(self._prepare(connection))
            await self._track(preparing.addTimeout(backend.timeout, backend.reactor))
        except Exception as error:
            connection.transport.abortConnection()
            await connection.lost
            if isinstance(error, defer.FirstError):
                error = error.subFailure.value
            if isinstance(error, txredisapi.ConnectionError):
                # "Lost connection" says less than the loss itself (a TLS refusal, a reset...).
                raise ConnectionError(connection.lost_reason.getErrorMessage()) from None
            raise error from None
        return connection


def _reason(error: BaseException) -> str:
    if isinstance(error, defer.TimeoutError):
        return "no answer in time"
    if isinstance(error, txredisapi.ResponseError):
        return f"Redis refused: {error}"
    return str(error) or type(error).__name__


def default_retry_policy() -> Callable[[int], float]:
    """Exponential backoff: about 0.5 s, 1 s, 2 s ... up to 30 s, with a little jitter."""
    return backoffPolicy(initialDelay=0.25, maxDelay=30.0, factor=2.0,
                         jitter=lambda: random.uniform(0, 0.25))


class RedisBackend:
    """The broker backend over Redis pub/sub (see the module docstring for the design)."""

    _log = Logger()

    def __init__(self, reactor, address: RedisAddress, endpoint=None, retry_policy=None,
                 timeout: float = TIMEOUT, prefix: str = CHANNEL_PREFIX):
        """`endpoint` and `retry_policy(attempt) -> seconds` default to the real ones."""
        self.reactor = reactor
        self.address = address
        self.endpoint = endpoint if endpoint is not None else redis_endpoint(reactor, address, timeout)
        self.retry_policy = retry_policy or default_retry_policy()
        self.timeout = timeout
        self._channels = Channels(f"{prefix}:{address.db}")
        self._deliver: Optional[Callable[[Message], int]] = None
        self._interest: set = set()
        self._confirmed: set = set()
        self._subscriber: Optional[_SubscriberConnection] = None
        self._running = False
        self._was_up = False
        self._last_state = "stopped"
        self._publisher_link = _Link("publish", self, _ConnectionFactory(reactor, _Connection),
                                     self._login)
        self._subscriber_link = _Link("subscribe", self, _ConnectionFactory(
            reactor, self._new_subscriber_connection), self._prepare_subscriber)

    @property
    def state(self) -> str:
        """"up", "down" (lost, reconnecting), "connecting" (never up yet) or "stopped"."""
        if not self._running:
            return "stopped"
        if self._publisher_link.ready is not None and self._subscriber_link.ready is not None:
            return "up"
        return "down" if self._was_up else "connecting"

    @property
    def subscribed_repos(self) -> frozenset:
        """Workspaces whose channel Redis has confirmed on the current subscribe connection."""
        return frozenset(self._confirmed - {ALL_REPOS})

    def start(self, deliver: Callable[[Message], int]):
        """Start connecting in the background; fires at once (Redis may come later)."""
        self._deliver = deliver
        self._running = True
        self._log.info("connecting to the Redis broker at {address}", address=self.address.display)
        self.link_changed()
        self._publisher_link.start()
        self._subscriber_link.start()
        return defer.succeed(None)

    def stop(self):
        """Close both connections and cancel retries; fires when they are closed."""
        self._running = False
        stopping = defer.gatherResults([self._publisher_link.stop(), self._subscriber_link.stop()])
        return stopping.addCallback(lambda _: None)

    def publish(self, messages):
        """PUBLISH each message in order; fires with the count, or fails with BrokerUnavailable."""
        messages = list(messages)
        state = self.state
        connection = self._publisher_link.ready
        if state != "up":
            return defer.fail(BrokerUnavailable(f"Redis broker {self.address.display} is {state}"))
        replies = [defer.maybeDeferred(connection.execute_command, "PUBLISH",
                                       self._channels.for_repo(message.repo_id),
                                       encode_message(message))
                   for message in messages]
        published = defer.gatherResults(replies, consumeErrors=True)
        timer = self.reactor.callLater(self.timeout, self._publish_timed_out, connection)

        def settled(result):
            if timer.active():
                timer.cancel()
            return result

        published.addBoth(settled)
        published.addCallbacks(lambda _: len(messages), self._publish_failed, errbackArgs=(timer,))
        return published

    def _publish_timed_out(self, connection: _Connection) -> None:
        # A Redis that does not answer is treated as lost: the pending PUBLISHes fail and
        # the link reconnects.
        self._log.error("Redis broker {address} did not answer a PUBLISH within {timeout}s; reconnecting",
                        address=self.address.display, timeout=self.timeout)
        connection.transport.abortConnection()

    def _publish_failed(self, failure, timer):
        error = failure.value
        if isinstance(error, defer.FirstError):
            error = error.subFailure.value
        reason = "no answer in time" if timer.called else _reason(error)
        raise BrokerUnavailable(
            f"Redis broker {self.address.display}: publish failed: {reason}") from None

    def interest_changed(self, repo_id: str, interested: bool) -> None:
        """Subscribe to a workspace's channel on its first local registration, drop it on its last."""
        if interested:
            self._interest.add(repo_id)
        else:
            self._interest.discard(repo_id)
            self._confirmed.discard(repo_id)
        connection = self._subscriber
        if connection is None:
            return  # the next subscribe connection subscribes to the interest of its time
        if interested:
            changing = self._subscribe(connection, repo_id)
        else:
            changing = _command(connection, self.reactor, self.timeout, "UNSUBSCRIBE",
                                self._channels.for_repo(repo_id))
        changing.addErrback(self._subscription_failed, connection, repo_id)

    def _subscription_failed(self, failure, connection, repo_id) -> None:
        if failure.check(txredisapi.ConnectionError):
            return  # lost: the reconnection resubscribes
        self._log.error("Redis (un)subscribe of workspace {repo_id} failed: {reason}; reconnecting",
                        repo_id=repo_id, reason=_reason(failure.value))
        connection.transport.abortConnection()

    def _subscribe(self, connection: _SubscriberConnection, repo_id: str) -> defer.Deferred:
        def confirmed(_):
            if connection is self._subscriber and (repo_id == ALL_REPOS or repo_id in self._interest):
                self._confirmed.add(repo_id)

        subscribing = _command(connection, self.reactor, self.timeout, "SUBSCRIBE",
                               self._channels.for_repo(repo_id))
        return subscribing.addCallback(confirmed)

    async def _login(self, connection: _Connection) -> None:
        """AUTH and SELECT as configured, then PING: a connection is ready once Redis answered."""
        if self.address.password:
            await _command(connection, self.reactor, self.timeout,
                           *(("AUTH", self.address.username, self.address.password)
                             if self.address.username else ("AUTH", self.address.password)))
        if self.address.db:
            # Pub/sub ignores it, but a database the server lacks is a configuration error.
            await _command(connection, self.reactor, self.timeout, "SELECT", self.address.db)
        await _command(connection, self.reactor, self.timeout, "PING")

    async def _prepare_subscriber(self, connection: _SubscriberConnection) -> None:
        await self._login(connection)
        # From here interest changes go straight to this connection; the snapshot below
        # covers those made before.
        self._subscriber = connection
        await defer.gatherResults(
            [self._subscribe(connection, repo_id) for repo_id in [ALL_REPOS, *sorted(self._interest)]],
            consumeErrors=True)

    def _new_subscriber_connection(self) -> _SubscriberConnection:
        connection = _SubscriberConnection(self._received)
        connection.on_lost = self._subscriber_lost
        return connection

    def _subscriber_lost(self, connection) -> None:
        if connection is self._subscriber:
            self._subscriber = None
            self._confirmed.clear()

    def _received(self, channel, payload) -> None:
        try:
            message = decode_message(payload)
        except (ValueError, TypeError, RecursionError) as error:
            self._log.error("dropped an undecodable message from Redis channel {channel}: {reason}",
                            channel=channel, reason=str(error))
            return
        try:
            self._deliver(message)
        except Exception:
            self._log.failure("local delivery of a message from Redis failed")

    def link_changed(self) -> None:
        """A connection came up or went down: log the state transitions."""
        state = self.state
        if state == self._last_state:
            return
        self._last_state = state
        if state == "up":
            self._was_up = True
            self._log.info("Redis broker {address} is up", address=self.address.display)
        elif state == "down":
            self._log.error("Redis broker {address} is down: publishing is refused until it is back",
                            address=self.address.display)
