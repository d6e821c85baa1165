"""The browser side: WebSocket protocol and factory (strict RFC 6455).

Wire protocol at `public.path`:

- Opening handshake: the browser is identified here (token in `?token=` or
  `Authorization: Bearer`, or its cookies forwarded to Pydio). A refusal is an HTTP
  error: 401 bad or missing credentials, 403 forbidden origin, 502/503 Pydio host
  trouble. A refused socket is never accepted.
- Browser -> server text frames: `register:<repoId>` listens to that workspace (when the
  user's acl on it contains "r"; otherwise ignored and logged), replacing the previous
  one; `unregister:<anything>` stops listening; anything else is ignored and counted.
  A binary frame closes the connection with 1003.
- Server -> browser: one text frame per message, exactly its CONTENT.
"""

from autobahn.websocket.protocol import PreparedMessage, WebSocketProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from pydio_ws.auth import AuthError, HandshakeRequest
from pydio_ws.commands import REGISTER, UNREGISTER, parse_command
from pydio_ws.wsbase import ServerFactoryBase, ServerProtocolBase

CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED_DATA = 1003


def frame_message(message) -> PreparedMessage:
    """Frame a message's CONTENT once, as an unmasked, uncompressed text frame."""
    return PreparedMessage(message.content.encode("utf-8"), False, False, True)


class BrowserProtocol(ServerProtocolBase):
    """One browser connection: identify at the handshake, then relay commands."""

    _log = Logger()

    def __init__(self):
        super().__init__()
        self._identity = None
        self._subscriber = None

    @property
    def _peer_host(self) -> str:
        return self.transport.getPeer().host

    def onConnect(self, request):
        factory = self.factory
        if not factory.origins.allows(request.origin):
            factory.refuse(self._peer_host, 403, f"origin {request.origin!r} not allowed")
            raise ConnectionDeny(403, "origin not allowed")
        handshake = HandshakeRequest(self._peer_host, request.headers, request.params)
        return Deferred.fromCoroutine(self._identify(handshake))

    async def _identify(self, handshake: HandshakeRequest):
        try:
            self._identity = await self.factory.authenticator.authenticate(handshake)
        except AuthError as error:
            self.factory.refuse(handshake.peer_host, error.status, error.reason)
            raise ConnectionDeny(error.status, error.reason) from None
        return None

    def onOpen(self):
        identity = self._identity
        self._subscriber = self.factory.broker.attach(
            identity.user_id, identity.group_path, self._deliver)
        self.factory.opened(self)
        self._log.info("browser {peer} connected as {user_id}",
                       peer=self._peer_host, user_id=identity.user_id)

    def _deliver(self, prepared: PreparedMessage) -> None:
        if self.state == WebSocketProtocol.STATE_OPEN:
            self.sendPreparedMessage(prepared)

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
            self._log.info("browser {peer} ({user_id}) unregistered",
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
        self._log.info("browser {peer} ({user_id}) registered on {repo_id}",
                       peer=self._peer_host, user_id=self._identity.user_id, repo_id=repo_id)

    def onClose(self, wasClean, code, reason):
        if self._subscriber is None:
            return
        self._subscriber.detach()
        self.factory.closed(self)
        self._log.info("browser {peer} ({user_id}) closed: code {code} {reason}",
                       peer=self._peer_host, user_id=self._identity.user_id,
                       code=code, reason=reason or "")


class BrowserFactory(ServerFactoryBase):
    """Builds browser connections; holds the collaborators and the open connections."""

    protocol = BrowserProtocol
    _log = Logger()

    def __init__(self, reactor, broker, authenticator, origins, stats):
        super().__init__(reactor)
        self.broker = broker
        self.authenticator = authenticator
        self.origins = origins
        self.stats = stats
        self._open = set()
        self.setProtocolOptions(versions=[13], webStatus=False, failByDrop=False)

    def refuse(self, peer_host: str, status: int, reason: str) -> None:
        """Count and log a refused browser handshake."""
        self.stats.refused_handshakes += 1
        self._log.info("browser {peer} refused: {status} {reason}",
                       peer=peer_host, status=status, reason=reason)

    def opened(self, protocol) -> None:
        self._open.add(protocol)

    def closed(self, protocol) -> None:
        self._open.discard(protocol)

    def close_all(self) -> Deferred:
        """Close every open browser with 1001; fires when all are gone."""
        closing = []
        for protocol in list(self._open):
            protocol.sendCloseFrame(CLOSE_GOING_AWAY, b"server shutting down")
            closing.append(protocol.is_closed)
        return DeferredList(closing)
