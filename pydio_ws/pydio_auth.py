"""Cookie-forwarding authentication of browsers against a Pydio host.

The exchange with the Pydio host, once per browser opening handshake (see below for the
sharing and caching that reduce it):

    GET <pydio_url>&key=<private key> HTTP/1.1      e.g. /pydio/?get_action=ws_authenticate
    Cookie: <the browser's Cookie header, verbatim>
    User-Agent: pydio-ws/<version>

Nothing else of the browser's request is forwarded. `key` is added to the query string
of `pydio_url` (replacing a `key` already there). The host answers with the user's XML
registry:

    <?xml version="1.0" encoding="UTF-8"?>
    <tree>
      <user id="alice" groupPath="/sales">
        <repositories>
          <repo id="1" acl="rw" ...><label>Files</label></repo>
        </repositories>
        ...
      </user>
    </tree>

and the Identity is `/tree/user/@id`, `/tree/user/@groupPath` (absent or empty: none)
and each `/tree/user/repositories/repo/@id` with its `@acl` ("r" when absent). The body
may end by Content-Length, by chunked encoding or by the host closing the connection
(PHP's built-in server): all three are complete replies.

Refusals (`AuthError`): no Cookie header, a `<message type="ERROR">` anywhere in the reply
(Pydio's answer to a missing session or a wrong key) or a reply without user: 401. A
non-200 status, a body that is not XML (or has a DTD or entities), not this shape or
larger than `MAX_REPLY_BYTES`: 502. A host that cannot be reached or does not answer
within `timeout` seconds: 503.

To spare the host, concurrent handshakes with the same Cookie header share one request,
successful answers are cached for `cache_ttl` seconds, and at most `max_concurrent`
requests are outstanding at once (the rest wait their turn, `max_queued` at most: past
that a handshake is refused with 503 at once, so a reconnect storm cannot pile up).
"""

import hashlib
from collections import OrderedDict
from contextlib import suppress
from typing import Callable, Optional
from urllib.parse import urlencode, urlsplit, urlunsplit
from xml.etree.ElementTree import ParseError

import hyperlink
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.error import ConnectError
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

from pydio_ws import __version__
from pydio_ws.auth import AuthError, HandshakeRequest, Identity

MAX_REPLY_BYTES = 1024 * 1024
USER_AGENT = f"pydio-ws/{__version__}"
_MAX_HOST_MESSAGE = 200

# What Agent.request fails with when the host cannot be reached or drops the connection.
_UNREACHABLE = (ConnectError, ResponseNeverReceived, ResponseFailed)


def url_with_key(pydio_url: str, key: str) -> bytes:
    """`pydio_url` (ASCII) with `key=<key>` added to its query, replacing any `key`."""
    parts = urlsplit(pydio_url)
    kept = [
        pair for pair in parts.query.split("&") if pair and pair.split("=", 1)[0] != "key"
    ]
    # urlencode percent-encodes "+" and "&": PHP would read a bare "+" as a space.
    query = "&".join(kept + [urlencode({"key": key})])
    return urlunsplit(parts._replace(query=query, fragment="")).encode("ascii")


def _one_line(text: str) -> str:
    """Host-supplied text made safe for a reason: one line, bounded length."""
    return " ".join(text.split())[:_MAX_HOST_MESSAGE]


def identity_from_registry(body: bytes) -> Identity:
    """Read the Identity from a Pydio XML registry reply; AuthError(401 or 502) otherwise."""
    try:
        tree = fromstring(body, forbid_dtd=True)
    except DefusedXmlException as error:
        raise AuthError(502, f"Pydio reply refused: {type(error).__name__}") from None
    except (ParseError, ValueError, LookupError) as error:
        raise AuthError(502, f"Pydio reply is not XML: {_one_line(str(error))}") from None
    if tree.tag != "tree":
        raise AuthError(502, f"Pydio reply is not a registry (root <{_one_line(tree.tag)}>)")
    for message in tree.iter("message"):
        if message.get("type") == "ERROR":
            text = _one_line("".join(message.itertext())) or "no reason given"
            raise AuthError(401, f"Pydio refused the session: {text}")
    users = tree.findall("user")
    if not users:
        raise AuthError(401, "Pydio reply has no user")
    if len(users) > 1:
        raise AuthError(502, "Pydio reply has several users")
    user = users[0]
    user_id = user.get("id")
    if not user_id:
        raise AuthError(502, "Pydio reply has a user without id")
    repos = {}
    for repo in user.findall("repositories/repo"):
        repo_id = repo.get("id")
        if not repo_id:
            raise AuthError(502, "Pydio reply has a repository without id")
        repos[repo_id] = repo.get("acl", "r")
    return Identity(user_id, user.get("groupPath") or None, repos)


class _BodyReader(Protocol):
    """Collect a response body up to `limit` bytes into the `finished` Deferred."""

    def __init__(self, limit: int):
        self.finished = Deferred(self._cancel)
        self._limit = limit
        self._size = 0
        self._chunks = []

    def _cancel(self, finished):
        self.transport.stopProducing()

    def dataReceived(self, data):
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.finished.errback(
                AuthError(502, f"Pydio reply is larger than {self._limit} bytes")
            )
            self.transport.stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason=None):
        if self.finished.called:
            return
        # PotentialDataLoss means "no Content-Length, not chunked": the host ended the
        # body by closing the connection, which is how such a body ends (RFC 9112 6.3).
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(
                AuthError(502, f"Pydio reply is incomplete: {_describe(reason)}")
            )


def _describe(failure: Failure) -> str:
    """A one-line cause of a client failure, unwrapping Agent's wrapper exceptions."""
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(_describe(inner) for inner in reasons)
    return _one_line(f"{type(failure.value).__name__}: {failure.getErrorMessage()}")


async def _read_body(response, limit: int) -> bytes:
    reader = _BodyReader(limit)
    response.deliverBody(reader)
    return await reader.finished


class PydioAuthenticator:
    """Identify browsers by forwarding their Cookie header to a Pydio host."""

    _log = Logger()

    def __init__(
        self,
        reactor,
        pydio_url: str,
        key_source: Callable[[], str],
        *,
        timeout: float = 5.0,
        cache_ttl: float = 10.0,
        max_concurrent: int = 16,
        max_queued: int = 1000,
        agent=None,
        clock=None,
        cache_size: int = 1024,
    ):
        """Authenticate against `pydio_url` with the key `key_source()` returns.

        `agent` is an IAgent for the requests (default: a non-persistent `Agent(reactor)`;
        pass your own for a TLS trust policy). `clock` times the timeout and the cache
        (default: `reactor`). At most `cache_size` identities are cached.
        """
        url = hyperlink.URL.from_text(pydio_url).to_uri()
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"pydio url must be http(s)://host/...: {pydio_url!r}")
        if timeout <= 0 or cache_ttl < 0 or max_concurrent < 1 or cache_size < 1:
            raise ValueError(
                "timeout, max_concurrent, cache_size must be > 0 and cache_ttl >= 0"
            )
        self._url = url.replace(fragment="").to_text()
        self._key_source = key_source
        self._timeout = timeout
        self._cache_ttl = cache_ttl
        self._cache_size = cache_size
        self._clock = reactor if clock is None else clock
        self._agent = Agent(reactor) if agent is None else agent
        self._slots = DeferredSemaphore(max_concurrent)
        self._max_queued = max_queued
        # Keyed by a digest of the Cookie header so session ids are not kept verbatim.
        self._cache: "OrderedDict[bytes, tuple[float, Identity]]" = OrderedDict()
        self._waiters: dict[bytes, list[Deferred]] = {}

    async def authenticate(self, request: HandshakeRequest) -> Identity:
        """Return the Identity of the browser's Pydio session, or raise AuthError."""
        cookie = request.headers.get("cookie", "").strip()
        if not cookie:
            raise AuthError(401, "no session cookie")
        digest = hashlib.sha256(cookie.encode("utf-8", "surrogatepass")).digest()
        cached = self._cached(digest)
        if cached is not None:
            return cached
        return await self._join(digest, cookie)

    def _cached(self, digest: bytes) -> Optional[Identity]:
        entry = self._cache.get(digest)
        if entry is None:
            return None
        expires, identity = entry
        if expires <= self._clock.seconds():
            del self._cache[digest]
            return None
        return identity

    def _remember(self, digest: bytes, identity: Identity):
        if not self._cache_ttl:
            return
        now = self._clock.seconds()
        self._cache[digest] = (now + self._cache_ttl, identity)
        self._cache.move_to_end(digest)
        # One ttl for all, so insertion order is expiry order: expired entries are first.
        while self._cache and next(iter(self._cache.values()))[0] <= now:
            self._cache.popitem(last=False)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _join(self, digest: bytes, cookie: str) -> Deferred:
        """A Deferred for this Cookie's answer, sharing a request already in flight."""
        # Each caller gets its own Deferred, so one caller cancelling (its browser went
        # away) neither cancels the shared request nor the other callers.
        waiter = Deferred()
        waiters = self._waiters.get(digest)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        if len(self._slots.waiting) >= self._max_queued:
            raise AuthError(503, f"Pydio host busy: {self._max_queued} authentications waiting")
        self._waiters[digest] = [waiter]
        Deferred.fromCoroutine(self._fetch(cookie)).addBoth(self._settle, digest)
        return waiter

    def _settle(self, result, digest: bytes):
        if isinstance(result, Identity):
            self._remember(digest, result)
        for waiter in self._waiters.pop(digest):
            if waiter.called:
                continue
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)
        # Each waiter carries the result on; the shared chain ends here.
        return None

    async def _fetch(self, cookie: str) -> Identity:
        """One request to the host, when a slot is free, within the timeout."""
        await self._slots.acquire()
        try:
            exchange = Deferred.fromCoroutine(self._exchange(cookie))
            exchange.addTimeout(self._timeout, self._clock, onTimeoutCancel=self._timed_out)
            return await exchange
        except AuthError as error:
            if error.status != 401:
                self._log.warn(
                    "Pydio host {url} failed: {reason}",
                    url=self._url, status=error.status, reason=error.reason,
                )
            raise
        finally:
            self._slots.release()

    def _timed_out(self, result, timeout):
        raise AuthError(503, f"Pydio host did not answer within {timeout:g} s")

    async def _exchange(self, cookie: str) -> Identity:
        try:
            # Handshake headers come decoded as latin-1: this restores their bytes.
            cookie_bytes = cookie.encode("latin-1")
        except UnicodeEncodeError:
            cookie_bytes = cookie.encode("utf-8")
        headers = Headers({b"Cookie": [cookie_bytes], b"User-Agent": [USER_AGENT.encode()]})
        url = url_with_key(self._url, self._key_source())
        try:
            response = await self._agent.request(b"GET", url, headers)
        except _UNREACHABLE as error:
            raise AuthError(
                503, f"cannot reach Pydio host: {_describe(Failure(error))}"
            ) from None
        if response.code != 200:
            # Read (and drop) the body so the connection ends cleanly.
            with suppress(AuthError):
                await _read_body(response, MAX_REPLY_BYTES)
            phrase = _one_line(response.phrase.decode("latin-1"))
            raise AuthError(502, f"Pydio host answered HTTP {response.code} {phrase}")
        return identity_from_registry(await _read_body(response, MAX_REPLY_BYTES))
