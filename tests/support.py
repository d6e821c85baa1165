"""Test helpers: the real service on loopback, real WebSocket and HTTP clients.

`ServerFixture.start(testcase, **settings)` runs `PydioWSService` from `load_config` on
ephemeral 127.0.0.1 ports and stops it on cleanup. `BrowserClient` is an Autobahn client
whose `next_message()` returns a Deferred of the next frame; `post()` publishes over
real HTTP; `raw_exchange()` writes raw bytes and collects the answer until close.
"""

import json
import shutil
import tempfile
import time
from typing import Optional

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.web.client import Agent, HTTPConnectionPool

from pydio_ws.auth import make_token
from pydio_ws.config import load_config
from pydio_ws.service import PydioWSService

KEY = "test-private-key-0123456789-abcdefghijkl"


def temp_dir(testcase) -> str:
    """A temporary directory removed when the test ends."""
    path = tempfile.mkdtemp(prefix="pydio-ws-test-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def settings_for(testcase, shared: bool = True, **settings) -> dict:
    """Raw config overrides for loopback ephemeral ports; `settings` use section_key names."""
    overrides = {
        ("public", "host"): "127.0.0.1", ("public", "port"): "0",
        ("private", "host"): "127.0.0.1" if shared else "localhost", ("private", "port"): "0",
        ("private", "key"): KEY,
        ("private", "generated_key_file"): f"{temp_dir(testcase)}/generated.key",
    }
    for name, value in settings.items():
        section, _, key = name.partition("_")
        overrides[section, key] = value
    return overrides


class ServerFixture:
    """A running PydioWSService and the addresses of its listeners."""

    def __init__(self, service: PydioWSService):
        self.service = service
        config = service.config
        if config.shared_listener:
            self.public_port = self.private_port = service.listening_port("listener-shared")
        else:
            self.public_port = service.listening_port("listener-public")
            self.private_port = service.listening_port("listener-private")
        self.public_path = config.public.path
        self.private_path = config.private.path

    @classmethod
    def start(cls, testcase, shared: bool = True, environ=None, **settings) -> "ServerFixture":
        config = load_config(environ=environ or {}, overrides=settings_for(testcase, shared, **settings))
        service = PydioWSService(config, reactor)
        service.startService()
        testcase.addCleanup(service.stopService)
        return cls(service)

    @property
    def private_url(self) -> str:
        return f"http://127.0.0.1:{self.private_port}{self.private_path}"

    def public_url(self, query: str = "") -> str:
        return f"ws://127.0.0.1:{self.public_port}{self.public_path}{query}"


def token(user: str = "alice", repos=None, group: Optional[str] = None, ttl: float = 600,
          key: str = KEY) -> str:
    """A valid browser token."""
    return make_token(key, user, repos if repos is not None else {"1": "rw"}, time.time() + ttl, group)


class BrowserProtocol(WebSocketClientProtocol):
    """Records frames; `next_message()` fires with the next one."""

    def __init__(self):
        super().__init__()
        self.received = defer.DeferredQueue()
        self.closed = defer.Deferred()
        self.close_code = None

    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.received.put(payload)

    def onClose(self, wasClean, code, reason):
        self.close_code = code
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"handshake failed: {reason}"))
        if not self.closed.called:
            self.closed.callback((code, reason))

    def next_message(self):
        return self.received.get()

    def say(self, text: str):
        """Send a text frame."""
        self.sendMessage(text.encode("utf-8"))

    async def close(self):
        if self.state == self.STATE_OPEN:
            self.sendClose(1000)
        await self.closed


async def connect_browser(testcase, url: str, port: int, headers=None, tls=None) -> BrowserProtocol:
    """Open a real Autobahn client connection (over TLS with `tls` client options)."""
    factory = WebSocketClientFactory(url, headers=headers or {})
    factory.protocol = BrowserProtocol
    factory.opened = defer.Deferred()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls is not None:
        endpoint = wrapClientTLS(tls, endpoint)
    await endpoint.connect(factory)
    client = await factory.opened
    testcase.addCleanup(client.close)
    return client


async def registered_browser(testcase, server: ServerFixture, repo: str = "1", **token_args):
    """A browser connected with a token and registered on `repo` (confirmed by the server)."""
    client = await connect_browser(testcase, server.public_url(f"?token={token(**token_args)}"),
                                   server.public_port)
    if repo is not None:
        client.say(f"register:{repo}")
        await wait_until(lambda: server.service.broker.registered_counts().get(repo, 0) > 0)
    return client


async def wait_until(predicate, polls: int = 1000, interval: float = 0.005):
    """Let the reactor run until `predicate()` holds; fails after `polls` checks."""
    for _ in range(polls):
        if predicate():
            return
        await task.deferLater(reactor, interval, lambda: None)
    raise AssertionError("condition never became true")


def http_client(testcase):
    """A treq client without persistent connections (nothing left open)."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return treq.client.HTTPClient(Agent(reactor, pool=pool))


async def post(testcase, url: str, body, key: Optional[str] = KEY, headers=None):
    """POST `body` (bytes, or a document sent as JSON); returns (status, parsed JSON or bytes)."""
    all_headers = {"X-Pydio-Key": [key]} if key is not None else {}
    all_headers.update(headers or {})
    data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    response = await http_client(testcase).post(url, data=data, headers=all_headers)
    content = await response.content()
    try:
        return response.code, json.loads(content)
    except ValueError:
        return response.code, content


async def request(testcase, method: str, url: str, headers=None):
    response = await http_client(testcase).request(method, url, headers=headers or {})
    content = await response.content()
    try:
        return response.code, json.loads(content)
    except ValueError:
        return response.code, content


class _RawClient(Protocol):
    def __init__(self):
        self.data = b""
        self.done = defer.Deferred()
        self.head = defer.Deferred()

    def dataReceived(self, data):
        self.data += data
        if b"\r\n\r\n" in self.data and not self.head.called:
            self.head.callback(self.data)

    def connectionLost(self, reason):
        self.done.callback(self.data)


async def raw_connect(port: int) -> _RawClient:
    """A raw TCP client on loopback; `.data` accumulates, `.done` fires at close."""
    return await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Factory.forProtocol(_RawClient))


async def raw_exchange(port: int, *chunks: bytes) -> bytes:
    """Write `chunks` on a fresh connection and return all bytes received until close."""
    client = await raw_connect(port)
    for chunk in chunks:
        client.transport.write(chunk)
    return await client.done


async def handshake_status(port: int, request: bytes) -> int:
    """Send a raw handshake; return the answer's status code, then close."""
    client = await raw_connect(port)
    client.transport.write(request)
    answer = await defer.DeferredList([client.head, client.done], fireOnOneCallback=True)
    client.transport.loseConnection()
    await client.done
    return status_of(answer[0])


def ws_handshake(path: str, port: int, headers: Optional[dict] = None, version: int = 13) -> bytes:
    """A raw RFC 6455 opening handshake request."""
    lines = [f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket",
             "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             f"Sec-WebSocket-Version: {version}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def status_of(answer: bytes) -> int:
    """The status code of a raw HTTP answer."""
    return int(answer.split(b" ", 2)[1])
