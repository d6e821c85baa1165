"""The publisher side: HTTP publish and status resources, and the publisher WebSocket.

HTTP, at `private.path` (authorized hosts only, then the key; see `pydio_ws.gate`):

    POST <path>          body: JSON object / array of objects, or PHP serialize() of an
                         array (see `pydio_ws.messages`). Key in X-Pydio-Key, Admin-Key
                         or Authorization: Bearer.
                         200 {"published": N}   400 {"error": reason}   401   403
                         405 other methods   413 body over private.max_body_size
                         503 the broker cannot take the message
    GET <path>/status    uptime, connections, registrations per workspace, counters.

WebSocket, at `private.path`: a publisher opens a socket with the key in `X-Pydio-Key` or
`Admin-Key` (checked at the handshake: 403/401) and sends one message per frame, JSON or
PHP-serialized. A bad frame gets a text reply `{"error": reason}`; the socket stays open.
The legacy Pydio 6 PHP client (Sec-WebSocket-Version 8) is accepted with its quirks, once
its host and key are checked: 8 stray bytes after the request head, and the non-minimal
64-bit length form for payloads of 65025..65535 bytes.
"""

import json

from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger
from twisted.web.server import NOT_DONE_YET

from pydio_ws.auth import AuthError
from pydio_ws.collector import collector_status
from pydio_ws.errors import DecodeError
from pydio_ws.messages import decode_body
from pydio_ws.web import JSONResource, finish_json, json_body, lower_headers
from pydio_ws.wsbase import ServerFactoryBase, ServerProtocolBase

LEGACY_STRAY_BYTES = 8
_NON_MINIMAL_LENGTH = "not using minimal length encoding"


class Publisher:
    """Decode, count and publish bodies; shared by the HTTP and WebSocket paths."""

    _log = Logger()

    def __init__(self, broker, stats):
        self._broker = broker
        self._stats = stats

    def decode(self, body: bytes, content_type: str = "") -> list:
        """Decode a body into messages, counting a refusal (DecodeError propagates)."""
        try:
            return decode_body(body, content_type)
        except DecodeError:
            self._stats.refused += 1
            raise

    def publish(self, messages: list):
        """Publish through the broker; fires with the count published."""
        self._stats.received += len(messages)
        return self._broker.publish(messages)


class StatusResource(JSONResource):
    """GET <private.path>/status: a JSON snapshot for authorized hosts."""

    isLeaf = True

    def __init__(self, reactor, gate, broker, stats):
        super().__init__()
        self._reactor = reactor
        self._gate = gate
        self._broker = broker
        self._stats = stats

    def render_GET(self, request):
        peer = request.getClientAddress().host
        if not self._gate.host_allowed(peer, lower_headers(request)):
            return json_body(request, 403, {"error": f"host {peer} is not authorized"})
        document = self._stats.as_dict(self._reactor.seconds())
        document["connections"] = {
            "open": self._broker.attached_count,
            "registered": self._broker.registered_counts(),
        }
        document["broker"] = {"state": self._broker.backend.state}
        document["collector"] = collector_status()
        return json_body(request, 200, document)


class PublishResource(JSONResource):
    """POST <private.path>: publish one message or a batch."""

    _log = Logger()

    def __init__(self, gate, publisher):
        super().__init__()
        self._gate = gate
        self._publisher = publisher

    def render_POST(self, request):
        peer = request.getClientAddress().host
        try:
            self._gate.check(peer, lower_headers(request))
        except AuthError as error:
            self._log.warn("publish from {peer} refused: {status} {reason}",
                           peer=peer, status=error.status, reason=error.reason)
            return json_body(request, error.status, {"error": error.reason})
        if request.body_too_large:
            limit = request.channel.site.max_body_size
            self._log.warn("publish from {peer} refused: body over {limit} bytes", peer=peer, limit=limit)
            return json_body(request, 413, {"error": f"body larger than {limit} bytes"})
        content_type = (request.getHeader("content-type") or "")
        try:
            messages = self._publisher.decode(request.content.read(), content_type)
        except DecodeError as error:
            self._log.warn("publish from {peer} refused: {reason}", peer=peer, reason=error.reason)
            return json_body(request, 400, {"error": error.reason})
        published = self._publisher.publish(messages)
        published.addCallbacks(
            lambda count: finish_json(request, 200, {"published": count}),
            lambda failure: self._failed(failure, request, peer))
        return NOT_DONE_YET

    def _failed(self, failure, request, peer) -> None:
        self._log.failure("publish from {peer} failed", failure, peer=peer)
        finish_json(request, 503, {"error": "broker unavailable"})


class PublisherProtocol(ServerProtocolBase):
    """A publisher's WebSocket: one message per frame."""

    _log = Logger()

    def __init__(self):
        super().__init__()
        self._stray_left = 0
        self._lenient = False

    @property
    def _peer_host(self) -> str:
        return self.transport.getPeer().host

    def onConnect(self, request):
        try:
            self.factory.gate.check(self._peer_host, request.headers)
        except AuthError as error:
            self._log.warn("publisher {peer} refused: {status} {reason}",
                           peer=self._peer_host, status=error.status, reason=error.reason)
            raise ConnectionDeny(error.status, error.reason) from None
        if request.version < 13:
            self._accept_legacy_client()
        self._log.info("publisher {peer} connected (version {version})",
                       peer=self._peer_host, version=request.version)
        return None

    def _accept_legacy_client(self) -> None:
        """Pydio 6's PHP client: skip its 8 stray bytes, accept its length encoding."""
        self._lenient = True
        skipped = self.data[:LEGACY_STRAY_BYTES]
        self.data = self.data[len(skipped):]
        self._stray_left = LEGACY_STRAY_BYTES - len(skipped)

    def dataReceived(self, data):
        if self._stray_left:
            skipped = data[:self._stray_left]
            self._stray_left -= len(skipped)
            data = data[len(skipped):]
        if data:
            super().dataReceived(data)

    def _protocol_violation(self, reason):
        # Autobahn has no option for this; the legacy client encodes 65025..65535-byte
        # payloads with the 64-bit length form. Pinned by the legacy publisher tests.
        if self._lenient and _NON_MINIMAL_LENGTH in reason:
            return False
        return super()._protocol_violation(reason)

    def onMessage(self, payload, isBinary):
        try:
            messages = self.factory.publisher.decode(payload)
        except DecodeError as error:
            self._log.warn("publisher {peer} sent a bad message: {reason}",
                           peer=self._peer_host, reason=error.reason)
            self.sendMessage(json.dumps({"error": error.reason}).encode("utf-8"))
            return
        published = self.factory.publisher.publish(messages)
        published.addErrback(self._failed)

    def _failed(self, failure):
        self._log.failure("publish from {peer} failed", failure, peer=self._peer_host)
        if self.state == self.STATE_OPEN:
            self.sendMessage(b'{"error": "broker unavailable"}')

    def onClose(self, wasClean, code, reason):
        self._log.info("publisher {peer} closed: code {code}", peer=self._peer_host, code=code)


class PublisherFactory(ServerFactoryBase):
    """Builds publisher connections (RFC 6455 and the legacy hybi-08 client)."""

    protocol = PublisherProtocol

    def __init__(self, reactor, gate, publisher):
        super().__init__(reactor)
        self.gate = gate
        self.publisher = publisher
        self.setProtocolOptions(versions=[8, 13], webStatus=False, failByDrop=False)

    def apply_limits(self, limits, max_message_size: int) -> None:
        """Take the [limits] timeouts and the largest message (private.max_body_size).

        Publishers are not pinged: they close when they are done."""
        self.setProtocolOptions(
            openHandshakeTimeout=limits.handshake_timeout, closeHandshakeTimeout=limits.close_timeout,
            maxFramePayloadSize=max_message_size, maxMessagePayloadSize=max_message_size)
