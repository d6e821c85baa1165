"""Listening sockets: read the request head, then hand the connection to its protocol.

A listener may serve the browser WebSocket, the publisher WebSocket and the private HTTP
resources on one port. Routing happens on the raw request head, before any parser sees
the bytes, because the legacy Pydio 6 publisher sends an absolute-form target
(`GET ws://host:port/private`, which twisted.web would answer 404) and 8 stray bytes
after its head (which twisted.web would take for the next request). WebSocket upgrades
go to the Autobahn factory of their path with every byte untouched; other requests go
to the twisted.web Site. The head is bounded in size and time.
"""

from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlsplit

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from pydio_ws.gate import carries_publisher_key

MAX_HEAD_BYTES = 16 * 1024
# Twisted's default of 50 overflows in reconnect storms; the kernel caps it at somaxconn.
LISTEN_BACKLOG = 1024
HEAD_END = b"\r\n\r\n"


@dataclass(frozen=True)
class Head:
    """The parts of a request head needed to route it."""

    method: str
    path: str
    headers: dict
    upgrade: bool


class BadHead(Exception):
    """A request head that cannot be routed; carries the HTTP status to answer."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_head(raw: bytes) -> Head:
    """Parse a request line and header lines (without the final CRLF CRLF)."""
    text = raw.decode("latin-1")
    request_line, *header_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[0].isalpha():
        raise BadHead(400, "bad request line")
    method, target, _ = parts
    headers = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise BadHead(400, "bad header line")
        headers[name.lower()] = value.strip()
    tokens = {token.strip().lower() for token in headers.get("upgrade", "").split(",")}
    try:
        path = urlsplit(target).path or "/"
    except ValueError:
        raise BadHead(400, "bad request target") from None
    return Head(method, path, headers, "websocket" in tokens)


@dataclass(frozen=True)
class Routes:
    """What a listener serves: WebSocket factories by path, and a Site for the rest.

    When the browser and publisher paths are equal (Pydio 6's single-path setup), a
    handshake carrying a publisher key header is a publisher, any other a browser.
    """

    site: Factory
    browser_path: Optional[str] = None
    browsers: Optional[Factory] = None
    publisher_path: Optional[str] = None
    publishers: Optional[Factory] = None

    def websocket_factory(self, head: Head) -> Optional[Factory]:
        if head.path == self.publisher_path and (
            head.path != self.browser_path or carries_publisher_key(head.headers)
        ):
            return self.publishers
        if head.path == self.browser_path:
            return self.browsers
        return None


class HandOver(Protocol):
    """Looks at a connection's first bytes, then hands it to the protocol they call for.

    Until then it holds a deadline: a peer that does not send enough in time is dropped.
    Afterwards it only forwards bytes and the connection loss to that protocol.
    """

    _log = Logger()
    awaited = "data"

    def __init__(self, reactor, timeout: float):
        self._reactor = reactor
        self._timeout = timeout
        self._inner: Optional[Protocol] = None
        self._timer = None

    def connectionMade(self):
        self._timer = self._reactor.callLater(self._timeout, self._timed_out)

    def _hand_over(self, factory: Factory, data: bytes) -> None:
        self._cancel_timer()
        self._inner = factory.buildProtocol(self.transport.getPeer())
        self._inner.makeConnection(self.transport)
        self._inner.dataReceived(data)

    def _timed_out(self) -> None:
        self._timer = None
        self._log.info("dropped {peer}: no {awaited} within {seconds} s",
                       peer=self.transport.getPeer().host, awaited=self.awaited, seconds=self._timeout)
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason):
        self._cancel_timer()
        if self._inner is not None:
            self._inner.connectionLost(reason)


class HandshakeRouter(HandOver):
    """Buffers the request head, then forwards the connection to the chosen protocol."""

    awaited = "complete request head"

    def __init__(self, routes: Routes, reactor, head_timeout: float):
        super().__init__(reactor, head_timeout)
        self._routes = routes
        self._buffer = b""

    def dataReceived(self, data):
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        self._buffer += data
        end = self._buffer.find(HEAD_END)
        if end < 0 and len(self._buffer) <= MAX_HEAD_BYTES:
            return
        try:
            if end < 0 or end + len(HEAD_END) > MAX_HEAD_BYTES:
                raise BadHead(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            self._route(parse_head(self._buffer[:end]))
        except BadHead as error:
            self._refuse(error.status, error.reason)

    def _route(self, head: Head) -> None:
        if head.upgrade:
            factory = self._routes.websocket_factory(head)
            if factory is None:
                raise BadHead(404, f"no WebSocket endpoint at {head.path}")
        else:
            factory = self._routes.site
        data, self._buffer = self._buffer, b""
        self._hand_over(factory, data)

    def _refuse(self, status: int, reason: str) -> None:
        self._cancel_timer()
        self._log.info("refused {peer}: {status} {reason}",
                       peer=self.transport.getPeer().host, status=status, reason=reason)
        body = reason.encode("utf-8")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, _STATUS_TEXT.get(status, b"Error"), len(body), body))
        self._buffer = b""
        self.transport.loseConnection()
        self._inner = _Discard()


class _Discard(Protocol):
    """Where bytes go after a refusal, until the connection closes."""

    def dataReceived(self, data):
        pass


_STATUS_TEXT = {400: b"Bad Request", 404: b"Not Found", 431: b"Request Header Fields Too Large"}


class ListenerFactory(Factory):
    """Builds a HandshakeRouter per accepted connection."""

    def __init__(self, routes: Routes, reactor, head_timeout: float = 10.0):
        self.routes = routes
        self._reactor = reactor
        self.head_timeout = head_timeout

    def buildProtocol(self, addr):
        return HandshakeRouter(self.routes, self._reactor, self.head_timeout)


class ListenerService(service.Service):
    """Listens on one endpoint; a bind failure raises, so startup stops."""

    def __init__(self, endpoint, factory, routers):
        """`factory` is what the endpoint serves; `routers` the ListenerFactories inside it."""
        self._endpoint = endpoint
        self._factory = factory
        self._routers = routers
        self.port = None

    def apply_limits(self, limits, max_body_size: int) -> None:
        """Reloadable settings of the routers and their HTTP sites."""
        for router in self._routers:
            router.routes.site.max_body_size = max_body_size
            router.head_timeout = limits.handshake_timeout

    def privilegedStartService(self):
        listening = self._endpoint.listen(self._factory)
        failures = []
        listening.addCallbacks(self._listening, failures.append)
        if failures:
            error = failures[0].value
            if isinstance(error, CannotListenError):
                # twistd lets SystemExit through: one clear line instead of a traceback.
                raise SystemExit(f"pydio-ws: cannot listen on {error.interface}:{error.port}: "
                                 f"{error.socketError}")
            failures[0].raiseException()
        super().privilegedStartService()

    def _listening(self, port):
        self.port = port

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port else defer.succeed(None)


def server_endpoint(reactor, host: str, port: int):
    """The server endpoint for a listen address."""
    description = (f"tcp:port={port}:interface={endpoints.quoteStringArgument(host)}"
                   f":backlog={LISTEN_BACKLOG}")
    return endpoints.serverFromString(reactor, description)
