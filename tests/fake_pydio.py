"""A fake Pydio host on loopback for the cookie-forwarding authenticator's tests.

`FakePydio` is a twisted.web resource served on 127.0.0.1 (port 0). It answers
`GET /pydio/?get_action=ws_authenticate&key=...` according to the request's Cookie header:
a `Reply` (any body, status and framing) or a `Held` reply the test releases later.
Unknown cookies get Pydio's "not logged in" error message. Every request is recorded
(path, query arguments, headers) so tests can check what was forwarded and count requests.

`CloseDelimitedPydio` is the raw-TCP variant that writes bytes verbatim and closes the
connection, as PHP's built-in server does with an HTTP/1.0 reply without Content-Length.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional
from xml.sax.saxutils import quoteattr

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

PATH = "/pydio/"
QUERY = "get_action=ws_authenticate"


def registry(user_id: str, group_path: Optional[str] = None,
             repos: Optional[Dict[str, Optional[str]]] = None) -> bytes:
    """Pydio's XML registry for a user; a repo whose acl is None has no acl attribute."""
    group = f" groupPath={quoteattr(group_path)}" if group_path is not None else ""
    items = "".join(
        f"<repo id={quoteattr(repo_id)}"
        + (f" acl={quoteattr(acl)}" if acl is not None else "")
        + ' access_type="fs"><label>Workspace</label></repo>'
        for repo_id, acl in (repos or {}).items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<tree><user id={quoteattr(user_id)}{group}><active_repo id=\"1\" write=\"1\"/>"
        f"<repositories>{items}</repositories><preferences/></user></tree>"
    ).encode("utf-8")


ERROR_REPLY = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<tree><message type="ERROR">You must be logged in</message></tree>'
)
GARBAGE_REPLY = b"<br />\n<b>Fatal error</b>: Allowed memory size exhausted in <b>index.php"


@dataclass
class Reply:
    """An immediate answer; `framing` is "length" (Content-Length) or "chunked"."""

    body: bytes
    code: int = 200
    framing: str = "length"


@dataclass
class Held:
    """An answer the test gives later with `release`; until then requests wait.

    `prefix` is written at once (chunked) so a request can also stall mid-body; the
    released reply's body must then start with it.
    """

    prefix: bytes = b""
    reply: Optional[Reply] = None
    waiting: List = field(default_factory=list)

    def release(self, reply: Reply):
        """Answer the waiting requests, and the later ones at once, with `reply`."""
        self.reply = reply
        waiting, self.waiting = self.waiting, []
        for request in waiting:
            _finish(request, reply, self.prefix)


@dataclass(frozen=True)
class Received:
    """A request as the fake host saw it; header names are lower-cased."""

    path: bytes
    args: Dict[bytes, List[bytes]]
    headers: Dict[bytes, List[bytes]]

    def header(self, name: bytes) -> Optional[bytes]:
        """The single value of header `name`, or None."""
        values = self.headers.get(name.lower())
        return values[0] if values else None


def _finish(request, reply: Reply, already_written: bytes = b""):
    if request.finished or request.channel is None:
        return
    if not already_written:
        request.setResponseCode(reply.code)
        request.setHeader(b"content-type", b"text/xml; charset=UTF-8")
    body = reply.body[len(already_written):] if already_written else reply.body
    if reply.framing == "length" and not already_written:
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
    else:
        # No Content-Length: twisted.web sends HTTP/1.1 replies chunked.
        middle = len(body) // 2
        request.write(body[:middle])
        request.write(body[middle:])
    request.finish()


class _Registry(Resource):
    isLeaf = True

    def __init__(self, host: "FakePydio"):
        super().__init__()
        self._host = host

    def render_GET(self, request):
        cookie = (request.getHeader(b"cookie") or b"").decode("latin-1")
        self._host._record(request)
        behaviour = self._host.replies.get(cookie, Reply(ERROR_REPLY))
        if isinstance(behaviour, Held):
            if behaviour.reply is not None:
                _finish(request, behaviour.reply)
                return NOT_DONE_YET
            behaviour.waiting.append(request)
            request.notifyFinish().addBoth(
                lambda _: request in behaviour.waiting and behaviour.waiting.remove(request)
            )
            if behaviour.prefix:
                request.setHeader(b"content-type", b"text/xml; charset=UTF-8")
                request.write(behaviour.prefix)
            return NOT_DONE_YET
        _finish(request, behaviour)
        return NOT_DONE_YET


class _Tracker:
    """The open server-side connections of a fake, to wait for them all to close."""

    def __init__(self):
        self.lost: Dict[object, Deferred] = {}

    def opened(self, protocol):
        self.lost[protocol] = Deferred()

    def closed(self, protocol):
        self.lost.pop(protocol).callback(None)

    def close_all(self) -> Deferred:
        waiting = list(self.lost.values())
        for protocol in list(self.lost):
            protocol.transport.abortConnection()
        return gatherResults(waiting)


class _TrackedChannel(HTTPChannel):
    def connectionMade(self):
        self.factory.tracker.opened(self)
        super().connectionMade()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.factory.tracker.closed(self)


class _TrackedSite(Site):
    protocol = _TrackedChannel

    def __init__(self, resource, reactor):
        super().__init__(resource, reactor=reactor)
        self.tracker = _Tracker()


class _LoopbackHost:
    """What the fakes share: a port on 127.0.0.1 (`_port`) and the tracker of its
    connections (`_tracker`), both set by the subclass."""

    _port = None
    _tracker: _Tracker

    def stop(self) -> Deferred:
        """Stop listening and close every connection; fires when all are closed."""
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        if self._port is not None:
            await self._port.stopListening()
        await self._tracker.close_all()


class FakePydio(_LoopbackHost):
    """A fake Pydio host; set `replies[cookie header] = Reply(...) or Held()`."""

    def __init__(self, reactor):
        self.replies: Dict[str, object] = {}
        self.received: List[Received] = []
        self.url = ""
        self.base_url = ""
        self._reactor = reactor
        self._site = _TrackedSite(_Registry(self), reactor)
        self._tracker = self._site.tracker
        self._next: List[Deferred] = []

    async def start(self, tls=None, host: str = "127.0.0.1") -> str:
        """Listen on 127.0.0.1; return (and set) `url`, the ws_authenticate URL.

        `tls` is a server connection creator for https; `host` is the URL's host name.
        """
        factory = self._site if tls is None else TLSMemoryBIOFactory(tls, False, self._site)
        self._port = self._reactor.listenTCP(0, factory, interface="127.0.0.1")
        scheme = "http" if tls is None else "https"
        self.base_url = f"{scheme}://{host}:{self._port.getHost().port}{PATH}"
        self.url = f"{self.base_url}?{QUERY}"
        return self.url


    def next_request(self) -> Deferred:
        """A Deferred firing with the next Received request."""
        waiter = Deferred()
        self._next.append(waiter)
        return waiter

    def _record(self, request):
        received = Received(
            path=request.path,
            args=dict(request.args),
            headers={
                name.lower(): list(values)
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
        )
        self.received.append(received)
        waiting, self._next = self._next, []
        for waiter in waiting:
            waiter.callback(received)


class _RawReply(Protocol):
    def connectionMade(self):
        self.factory.tracker.opened(self)
        self._head = b""

    def dataReceived(self, data):
        if self._head.endswith(b"\r\n\r\n"):
            return
        self._head += data
        if b"\r\n\r\n" in self._head:
            self.factory.received.append(self._head)
            self.transport.write(self.factory.reply)
            self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self.factory.tracker.closed(self)


class CloseDelimitedPydio(_LoopbackHost):
    """A raw TCP host that writes `reply` verbatim after a request head, then closes."""

    def __init__(self, reactor, reply: bytes):
        self.received: List[bytes] = []
        self.url = ""
        self._reactor = reactor
        self._factory = Factory.forProtocol(_RawReply)
        self._factory.reply = reply
        self._factory.received = self.received
        self._factory.tracker = self._tracker = _Tracker()

    async def start(self) -> str:
        """Listen on 127.0.0.1; return (and set) `url`."""
        self._port = self._reactor.listenTCP(0, self._factory, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self._port.getHost().port}{PATH}?{QUERY}"
        return self.url



async def unreachable_url(reactor) -> str:
    """A ws_authenticate URL on a loopback port nothing listens on (just closed)."""
    port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    number = port.getHost().port
    await port.stopListening()
    return f"http://127.0.0.1:{number}{PATH}?{QUERY}"
