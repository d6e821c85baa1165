"""twisted.web plumbing: a body-size-bounded request and JSON resources."""

import json

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

REQUEST_HEADERS_OF_INTEREST = ("x-pydio-key", "admin-key", "authorization", "x-forwarded-for")


class BoundedRequest(Request):
    """A request that stops storing its body past the site's `max_body_size`.

    The body is still read off the socket (the answer comes after it), but never held
    in memory or spooled to disk beyond the limit; `body_too_large` tells the resource.
    """

    body_too_large = False
    _body_received = 0

    def gotLength(self, length):
        limit = self.channel.site.max_body_size
        if length is not None and length > limit:
            self.body_too_large = True
            length = 0
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.body_too_large:
            return
        self._body_received += len(data)
        if self._body_received > self.channel.site.max_body_size:
            self.body_too_large = True
            return
        super().handleContentChunk(data)


class BoundedSite(Site):
    """A Site whose requests are bounded by `max_body_size` bytes.

    Bodies are left to the resources: twisted.web would otherwise parse the Content-Type
    of every POST with the email package (two throw-away classes per request, garbage
    for the cycle collector) and answer form bodies it cannot parse with a bare 400.
    """

    requestFactory = BoundedRequest

    def __init__(self, resource, max_body_size: int, reactor=None):
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        self.max_body_size = max_body_size
        self.displayTracebacks = False

    def log(self, request):
        """Access lines are left to the resources' own structured events."""


def json_body(request, status: int, document) -> bytes:
    """Set status and JSON content type; return the encoded document."""
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document).encode("utf-8") + b"\n"


def finish_json(request, status: int, document) -> None:
    """Answer a deferred request, unless the client has gone away meanwhile."""
    if request.finished or request.channel is None:
        return
    request.write(json_body(request, status, document))
    request.finish()


def lower_headers(request, names=REQUEST_HEADERS_OF_INTEREST) -> dict:
    """The named request headers, lower-cased names -> value (absent ones left out)."""
    headers = {}
    for name in names:
        value = request.getHeader(name)
        if value is not None:
            headers[name] = value
    return headers


class JSONResource(Resource):
    """A resource that answers unsupported methods with a JSON 405."""

    def render(self, request):
        method = request.method.decode("latin-1")
        if not hasattr(self, f"render_{method}"):
            allowed = sorted(name[len("render_"):] for name in dir(self)
                             if name.startswith("render_") and name != "render_HEAD")
            request.setHeader(b"allow", ", ".join(allowed).encode("ascii"))
            return json_body(request, 405, {"error": f"method {method} not allowed"})
        return super().render(request)


class UpgradeRequired(Resource):
    """What a plain HTTP request to a WebSocket path gets: 426."""

    isLeaf = True

    def render(self, request):
        request.setHeader(b"upgrade", b"websocket")
        return json_body(request, 426, {"error": "this path speaks WebSocket only"})


def mount(root: Resource, path: str, resource: Resource) -> None:
    """Put `resource` at URL `path` under `root`, creating plain parents as needed."""
    segments = path.strip("/").split("/")
    parent = root
    for segment in segments[:-1]:
        child = parent.children.get(segment.encode())
        if child is None:
            child = Resource()
            parent.putChild(segment.encode(), child)
        parent = child
    parent.putChild(segments[-1].encode(), resource)
