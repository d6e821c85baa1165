"""The browser side: WebSocket protocol and factory (strict RFC 6455).

Wire protocol at `public.path`:

- Opening handshake: the browser is identified here (token in `?token=` or
  `Authorization: Bearer`, or its cookies forwarded to Pydio). A refusal is an HTTP
  error: 401 bad or missing credentials, 403 forbidden origin, 429 too many failed
  authentications from this IP, 502/503 Pydio host trouble, 503 connection limits.
  A refused socket is never accepted.
- Browser -> server text frames: `register:<repoId>` listens to that workspace (when the
  user's acl on it contains "r"; otherwise ignored and logged), replacing the previous
  one; `unregister:<anything>` stops listening; anything else is ignored and counted.
  A binary frame closes the connection with 1003.
- Server -> browser: one text frame per message, exactly its CONTENT. A browser that
  stops reading is closed with 1008 ("slow consumer") once it is `max_pending_bytes`
  behind; a browser that does not answer pings is dropped.
"""

from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

from pydio_ws.auth import AuthError, HandshakeRequest
from pydio_ws.batching import TurnBatcher, send_now
from pydio_ws.commands import REGISTER, UNREGISTER, parse_command
from pydio_ws.limits import client_address
from pydio_ws.wsbase import ServerFactoryBase, ServerProtocolBase

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_POLICY_VIOLATION = 1008


def frame_message(message) -> bytes:
    """Frame a message's CONTENT once: the bytes of an unmasked text frame.

    Browsers never get permessage-deflate (the factory accepts no compression offer),
    so the same bytes are valid on every connection.
    """
    return PreparedMessage(message.content.encode("utf-8"), False, False, True).payloadHybi


@implementer(IPushProducer)
class BrowserProtocol(ServerProtocolBase):
    """One browser connection: identify at the handshake, then relay commands.

    Delivered frames are batched for the reactor turn (see `pydio_ws.batching`). The
    protocol is the streaming producer of its transport: while the transport's buffer
    is full, batches wait in a backlog, and a backlog over `max_pending_bytes` closes
    the connection (slow consumer) instead of growing without bound.
    """

    _log = Logger()

    def __init__(self):
        super().__init__()
        self._identity = None
        self._subscriber = None
        self._client = None
        self._counted = False
        self._paused = False
        self._batch = ()  # frames of this turn; () when none (no allocation)
        self._batcher = None
        self._backlog = []
        self._backlog_bytes = 0

    @property
    def _peer_host(self) -> str:
        return self._client or self.transport.getPeer().host

    def onConnect(self, request):
        factory = self.factory
        self._client = client_address(self.transport.getPeer().host,
                                      request.headers.get("x-forwarded-for"), factory.trusted_proxies)
        if factory.failures.blocked(self._client):
            self._deny(429, "too many failed authentications")
        if not factory.origins.allows(request.origin):
            self._deny(403, f"origin {request.origin!r} not allowed")
        refusal = factory.counter.acquire(self._client)
        if refusal:
            self._deny(503, refusal)
        self._counted = True
        handshake = HandshakeRequest(self._client, request.headers, request.params)
        return Deferred.fromCoroutine(self._identify(handshake))

    def _deny(self, status: int, reason: str):
        self.factory.refuse(self._client, status, reason)
        raise ConnectionDeny(status, reason)

    async def _identify(self, handshake: HandshakeRequest):
        try:
            self._identity = await self.factory.authenticator.authenticate(handshake)
        except AuthError as error:
            if error.status == 401:
                self.factory.failures.record_failure(self._client)
            self._deny(error.status, error.reason)
        except Exception:
            self._log.failure("authenticating {peer} failed", peer=self._client)
            self._deny(500, "internal error")
        return None

    def onOpen(self):
        identity = self._identity
        self._batcher = self.factory.batcher
        self._subscriber = self.factory.broker.attach(
            identity.user_id, identity.group_path, self._deliver)
        self.factory.opened(self)
        self.transport.registerProducer(self, True)
        self._log.info("browser {peer} connected as {user_id}",
                       peer=self._peer_host, user_id=identity.user_id)

    def _deliver(self, frame: bytes) -> None:
        """Broker callback: add a framed message to this turn's batch (the hot path:
        once per recipient; whether the connection is still open is checked at flush)."""
        batch = self._batch
        if batch:
            batch.append(frame)
        else:
            self._batch = [frame]
            self._batcher.mark(self)

    def flush_batch(self) -> None:
        """Send this turn's frames in one write, unless the connection is closing."""
        batch, self._batch = self._batch, ()
        if not batch or self.state != WebSocketProtocol.STATE_OPEN:
            return
        data = batch[0] if len(batch) == 1 else b"".join(batch)
        if not self._paused:
            send_now(self.transport, data)
            return
        self._backlog.append(data)
        self._backlog_bytes += len(data)
        if self._backlog_bytes > self.factory.max_pending_bytes:
            self._drop_slow_consumer()

    def _drop_slow_consumer(self) -> None:
        self.factory.stats.slow_consumers += 1
        self._log.warn("browser {peer} ({user_id}) is a slow consumer: {pending} bytes pending, "
                       "closing 1008", peer=self._peer_host, user_id=self._identity.user_id,
                       pending=self._backlog_bytes)
        self._backlog, self._backlog_bytes = [], 0
        self.sendCloseFrame(CLOSE_POLICY_VIOLATION, b"slow consumer")

    def sendCloseFrame(self, code=None, reasonUtf8=None, isReply=False):
        """Send everything delivered so far before the close frame, never after it."""
        self.factory.batcher.forget(self)
        self.flush_batch()
        if self._backlog:
            # Ahead of the close frame, whatever the transport's buffer holds: a message
            # accepted before a shutdown must still reach a browser that lags behind.
            backlog, self._backlog, self._backlog_bytes = self._backlog, [], 0
            self.transport.write(b"".join(backlog))
        super().sendCloseFrame(code, reasonUtf8, isReply)

    def onAutoPingTimeout(self):
        self.factory.stats.ping_timeouts += 1
        self._log.info("browser {peer} ({user_id}) did not answer a ping: dropped",
                       peer=self._peer_host, user_id=self._identity.user_id)
        super().onAutoPingTimeout()

    def pauseProducing(self):
        self._paused = True

    def resumeProducing(self):
        self._paused = False
        while self._backlog and not self._paused:
            frame = self._backlog.pop(0)
            self._backlog_bytes -= len(frame)
            self.transport.write(frame)

    def stopProducing(self):
        self._backlog, self._backlog_bytes = [], 0

    def onMessage(self, payload, isBinary):
        if isBinary:
            self._log.info("browser {peer} ({user_id}) sent a binary frame: closing 1003",
                           peer=self._peer_host, user_id=self._identity.user_id)
            self.sendCloseFrame(CLOSE_UNSUPPORTED_DATA, b"binary frames are not accepted")
            return
        command = parse_command(payload.decode("utf-8"))
        if command.kind == REGISTER:
            self._register(command.repo_id)
        elif command.kind == UNREGISTER:
            self._subscriber.unregister()
            self._log.debug("browser {peer} ({user_id}) unregistered",
                            peer=self._peer_host, user_id=self._identity.user_id)
        else:
            self.factory.stats.ignored_commands += 1
            self._log.debug("browser {peer} ({user_id}) sent an unknown command",
                            peer=self._peer_host, user_id=self._identity.user_id)

    def _register(self, repo_id: str) -> None:
        if not self._identity.can_read(repo_id):
            self.factory.stats.ignored_commands += 1
            self._log.warn("browser {peer} ({user_id}) may not read {repo_id}: register ignored",
                           peer=self._peer_host, user_id=self._identity.user_id, repo_id=repo_id)
            return
        self._subscriber.register(repo_id)
        self._log.debug("browser {peer} ({user_id}) registered on {repo_id}",
                        peer=self._peer_host, user_id=self._identity.user_id, repo_id=repo_id)

    def onClose(self, wasClean, code, reason):
        self.factory.batcher.forget(self)
        self._batch = ()
        if self._counted:
            self._counted = False
            self.factory.counter.release(self._client)
        if self._subscriber is None:
            return
        if self.closedByMe and self.localCloseCode:
            code = self.localCloseCode  # ours is the one that says why (1008, 1009, ...)
        self.factory.stats.closes[code] += 1
        self._subscriber.detach()
        self._subscriber = None
        self.factory.closed(self)
        self._log.info("browser {peer} ({user_id}) closed: code {code} {reason}",
                       peer=self._peer_host, user_id=self._identity.user_id,
                       code=code, reason=reason or "")


class BrowserFactory(ServerFactoryBase):
    """Builds browser connections; holds the collaborators and the open connections."""

    protocol = BrowserProtocol
    _log = Logger()

    def __init__(self, reactor, broker, authenticator, origins, stats, counter, failures):
        super().__init__(reactor)
        self.broker = broker
        self.authenticator = authenticator
        self.origins = origins
        self.stats = stats
        self.counter = counter
        self.failures = failures
        self.trusted_proxies = ()
        self.max_pending_bytes = 4 * 1024 * 1024
        self.batcher = TurnBatcher(reactor)
        self._open = set()
        self.setProtocolOptions(versions=[13], webStatus=False, failByDrop=False)

    def apply_limits(self, limits) -> None:
        """Take the [limits] settings; open connections keep the options they opened with."""
        self.trusted_proxies = limits.trusted_proxies
        self.max_pending_bytes = limits.max_pending_bytes
        self.counter.configure(limits.max_connections, limits.max_connections_per_ip)
        self.failures.configure(limits.max_auth_failures, limits.auth_failure_window)
        self.setProtocolOptions(
            maxFramePayloadSize=limits.max_message_size, maxMessagePayloadSize=limits.max_message_size,
            openHandshakeTimeout=limits.handshake_timeout, closeHandshakeTimeout=limits.close_timeout,
            autoPingInterval=limits.ping_interval, autoPingTimeout=limits.ping_timeout,
            # Null origins go to our OriginPolicy (403) rather than Autobahn's filter (400);
            # setProtocolOptions resets this one to False whenever it is not given.
            allowNullOrigin=True)

    def refuse(self, peer_host: str, status: int, reason: str) -> None:
        """Count and log a refused browser handshake."""
        self.stats.refused_handshakes[status] += 1
        self._log.info("browser {peer} refused: {status} {reason}",
                       peer=peer_host, status=status, reason=reason)

    def opened(self, protocol) -> None:
        self._open.add(protocol)

    def closed(self, protocol) -> None:
        self._open.discard(protocol)

    def close_all(self, timeout: float) -> Deferred:
        """Close every open browser with 1001; fires when all are gone, dropping any
        still open after `timeout` seconds."""
        closing = []
        for protocol in list(self._open):
            protocol.sendCloseFrame(CLOSE_GOING_AWAY, b"server shutting down")
            closing.append(protocol.is_closed)
        deadline = self.reactor.callLater(timeout, self._drop_all)
        done = DeferredList(closing)
        done.addBoth(lambda _: deadline.active() and deadline.cancel())
        return done

    def _drop_all(self) -> None:
        for protocol in list(self._open):
            self._log.info("browser {peer} did not close in time: dropped", peer=protocol._peer_host)
            protocol.dropConnection(abort=True)
