"""Tests of pydio_ws.tls: credential checks, and real TLS handshakes on loopback sockets.

Servers listen on 127.0.0.1 port 0 through `SSL4ServerEndpoint` with the reloadable context
factory; clients are Twisted's TLS client, Python's `ssl` module (in a thread, for protocol
versions and ALPN) and `Agent` with `client_tls_policy` against a tiny twisted.web site.
Every test waits for both sides of its connections to close before its port is stopped.
"""

import shutil
import socket
import ssl
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Optional

from OpenSSL import SSL
from service_identity import VerificationError
from service_identity.cryptography import DNS_ID
from service_identity.hazmat import DNSMismatch
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from pydio_ws.tls import (
    ReloadableServerContextFactory,
    ServerTLSFiles,
    TLSError,
    TLSVerifyError,
    client_tls_policy,
    describe_certificate,
    describe_tls_failure,
    load_server_credentials,
)
from tests.certs import make_test_certs


def _now() -> datetime:
    # The handshakes below are verified by OpenSSL against the wall clock, so the
    # certificates are generated and checked against it too.
    return datetime.now(timezone.utc)


def _pem(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class _Tracked(ProtocolWrapper):
    """Server-side connection that reports its close to the tracking factory."""

    def connectionLost(self, reason):
        ProtocolWrapper.connectionLost(self, reason)
        self.factory.closed(self, reason)


class _Tracking(WrappingFactory):
    """Wraps a server factory to know each connection's close reason and wait for it."""

    protocol = _Tracked

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.reasons = []
        self._lost = {}

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self._lost[protocol] = Deferred()
        return protocol

    def closed(self, protocol, reason):
        self.reasons.append(reason)
        self._lost[protocol].callback(None)

    def all_closed(self) -> Deferred:
        return DeferredList(list(self._lost.values()))


class _Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"hello"


class _Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


@implementer(IHandshakeListener)
class _Client(Protocol):
    """Twisted TLS client: `handshake` fires when done, `read(n)`, `when_closed()`."""

    def __init__(self):
        self.handshake = Deferred()
        self.received = b""
        self.reason: Optional[Failure] = None
        self._reading = None
        self._closed = []

    def handshakeCompleted(self):
        self.handshake.callback(None)

    def dataReceived(self, data):
        self.received += data
        if self._reading is not None and len(self.received) >= self._reading[0]:
            waiting, self._reading = self._reading[1], None
            waiting.callback(self.received)

    def read(self, size: int) -> Deferred:
        """Fires with everything received once at least `size` bytes arrived."""
        waiting = Deferred()
        self._reading = (size, waiting)
        self.dataReceived(b"")
        return waiting

    def peer_serial(self) -> int:
        return self.transport.getPeerCertificate().to_cryptography().serial_number

    def connectionLost(self, reason):
        self.reason = reason
        if not self.handshake.called:
            self.handshake.errback(reason)
        if self._reading is not None:
            self._reading[1].errback(reason)
        for waiting in self._closed:
            waiting.callback(reason.value)

    def when_closed(self) -> Deferred:
        """Fires with the exception the connection was closed with."""
        if self.reason is not None:
            return succeed(self.reason.value)
        waiting = Deferred()
        self._closed.append(waiting)
        return waiting


@dataclass(frozen=True)
class _Exchange:
    alpn: Optional[str]
    version: str
    cipher: str
    echoed: bytes


def _ssl_exchange(port: int, context: ssl.SSLContext) -> _Exchange:
    """Blocking: handshake with `context`, echo b"ping", close without waiting."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"ping")
            echoed = b""
            while len(echoed) < 4:
                chunk = tls.recv(4 - len(echoed))
                if not chunk:
                    break
                echoed += chunk
            return _Exchange(tls.selected_alpn_protocol(), tls.version(), tls.cipher()[0],
                             echoed)


async def _failure_of(deferred) -> Failure:
    """The Failure `deferred` ends with; AssertionError if it succeeds."""
    try:
        result = await deferred
    except Exception:
        return Failure()
    raise AssertionError(f"expected a failure, got {result!r}")


class _LoopbackTLS:
    """Listening and connecting helpers shared by the socket tests."""

    def setUp(self):
        self.certs = make_test_certs(self)

    def files(self, cert: str = "", key: str = "", **extra) -> ServerTLSFiles:
        return ServerTLSFiles(cert or self.certs.server_cert, key or self.certs.server_key,
                              **extra)

    async def listen(self, creator, factory=None):
        """Listen on 127.0.0.1:0; returns (port number, tracking factory)."""
        tracking = _Tracking(factory or Factory.forProtocol(_Echo))
        endpoint = SSL4ServerEndpoint(reactor, 0, creator, interface="127.0.0.1")
        port = await endpoint.listen(tracking)
        self.addCleanup(port.stopListening)
        self.addCleanup(tracking.all_closed)
        return port.getHost().port, tracking

    async def connect(self, port: int, creator) -> _Client:
        """A Twisted TLS client, closed (and waited for) on cleanup."""
        client = _Client()
        endpoint = wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port))
        await connectProtocol(endpoint, client)
        self.addCleanup(self._close, client)
        return client

    async def _close(self, client: _Client):
        if client.reason is None:
            client.transport.loseConnection()
        await client.when_closed()

    def trusting(self, ca: str = "", client_cert: str = "", client_key: str = ""):
        """Twisted's own client creator for "localhost", trusting `ca` (default: test CA)."""
        extra = {}
        if client_cert:
            extra["clientCertificate"] = PrivateCertificate.loadPEM(
                _pem(client_cert) + _pem(client_key)
            )
        return optionsForClientTLS(
            "localhost", trustRoot=Certificate.loadPEM(_pem(ca or self.certs.ca)), **extra
        )

    def ssl_context(self, ca: str = "") -> ssl.SSLContext:
        return ssl.create_default_context(cafile=ca or self.certs.ca)


class ServerCredentialsTests(TestCase):
    """load_server_credentials and describe_certificate, on files, without a reactor."""

    def setUp(self):
        self.certs = make_test_certs(self)

    def test_good_files_give_names_and_expiry(self):
        """A good certificate yields its SANs (DNS and IP), its chain and its expiry."""
        credentials = load_server_credentials(
            ServerTLSFiles(self.certs.server_cert, self.certs.server_key), _now()
        )
        self.assertEqual(credentials.names, ("localhost", "127.0.0.1"))
        self.assertEqual(len(credentials.chain), 1)
        self.assertEqual(credentials.not_after, credentials.certificate.not_valid_after_utc)

    def test_separate_chain_file_is_appended(self):
        """A chain file completes a certificate file that holds the leaf alone."""
        credentials = load_server_credentials(
            ServerTLSFiles(self.certs.server_leaf, self.certs.server_key,
                           chain=self.certs.intermediate),
            _now(),
        )
        self.assertIn("intermediate", credentials.chain[0].subject.rfc4514_string())

    def test_missing_file_is_named(self):
        """A missing certificate file gives its config key and path."""
        missing = f"{self.certs.directory}/absent.pem"
        with self.assertRaises(TLSError) as raised:
            load_server_credentials(ServerTLSFiles(missing, self.certs.server_key), _now())
        self.assertEqual(str(raised.exception), f"public.ssl_cert {missing}: no such file")

    def test_label_prefixes_messages(self):
        """The label of the files ("private") prefixes the key names in messages."""
        missing = f"{self.certs.directory}/absent.key"
        files = ServerTLSFiles(self.certs.server_cert, missing, label="private")
        with self.assertRaises(TLSError) as raised:
            load_server_credentials(files, _now())
        self.assertEqual(str(raised.exception), f"private.ssl_key {missing}: no such file")

    def test_file_without_certificate_is_refused(self):
        """A certificate path holding no PEM certificate is refused."""
        with self.assertRaises(TLSError) as raised:
            load_server_credentials(
                ServerTLSFiles(self.certs.server_key, self.certs.server_key), _now()
            )
        self.assertIn("no PEM certificate found", str(raised.exception))

    def test_combined_certificate_and_key_file_is_accepted(self):
        """One file holding certificate, chain and key can serve as both paths."""
        combined = f"{self.certs.directory}/combined.pem"
        with open(combined, "wb") as f:
            f.write(_pem(self.certs.server_cert) + _pem(self.certs.server_key))
        credentials = load_server_credentials(ServerTLSFiles(combined, combined), _now())
        self.assertEqual(credentials.names, ("localhost", "127.0.0.1"))

    def test_mismatched_key_is_refused(self):
        """A key that is not the certificate's is refused."""
        with self.assertRaises(TLSError) as raised:
            load_server_credentials(
                ServerTLSFiles(self.certs.server_cert, self.certs.mismatched_key), _now()
            )
        self.assertEqual(str(raised.exception), "public.ssl_key does not match public.ssl_cert")

    def test_expired_certificate_is_refused(self):
        """An expired certificate is refused with its expiry date."""
        with self.assertRaises(TLSError) as raised:
            load_server_credentials(
                ServerTLSFiles(self.certs.expired_cert, self.certs.expired_key), _now()
            )
        self.assertRegex(str(raised.exception),
                         r"^public\.ssl_cert expired on \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")

    def test_not_yet_valid_certificate_is_refused(self):
        """A certificate whose validity starts tomorrow is refused."""
        with self.assertRaises(TLSError) as raised:
            load_server_credentials(
                ServerTLSFiles(self.certs.not_yet_valid_cert, self.certs.not_yet_valid_key),
                _now(),
            )
        self.assertIn("public.ssl_cert is not valid before", str(raised.exception))

    def test_chain_out_of_order_is_refused(self):
        """A chain whose next certificate is not the issuer of the previous is refused."""
        with self.assertRaises(TLSError) as raised:
            load_server_credentials(
                ServerTLSFiles(self.certs.wrong_order_cert, self.certs.server_key), _now()
            )
        self.assertIn("chain out of order", str(raised.exception))

    def test_missing_client_ca_is_named(self):
        """A missing client CA file is refused under its own key name."""
        missing = f"{self.certs.directory}/absent-ca.pem"
        files = ServerTLSFiles(self.certs.server_cert, self.certs.server_key, client_ca=missing)
        with self.assertRaises(TLSError) as raised:
            load_server_credentials(files, _now())
        self.assertEqual(str(raised.exception),
                         f"public.ssl_client_ca {missing}: no such file")

    def test_five_day_certificate_expires_soon(self):
        """A certificate with five days left expires soon; one with a year left does not."""
        now = _now()
        expiring = load_server_credentials(
            ServerTLSFiles(self.certs.expiring_cert, self.certs.expiring_key), now
        )
        good = load_server_credentials(
            ServerTLSFiles(self.certs.server_cert, self.certs.server_key), now
        )
        self.assertTrue(expiring.expires_soon(now))
        self.assertFalse(expiring.expires_soon(now, days=4))
        self.assertFalse(good.expires_soon(now))

    def test_describe_certificate_gives_names_and_days_left(self):
        """describe_certificate names the certificate and counts the days to expiry."""
        now = _now()
        credentials = load_server_credentials(
            ServerTLSFiles(self.certs.expiring_cert, self.certs.expiring_key), now
        )
        expiry = credentials.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.assertEqual(describe_certificate(credentials, now),
                         f"names: localhost, 127.0.0.1; expires {expiry} (in 5 days)")
        later = now + timedelta(days=7)
        self.assertEqual(describe_certificate(credentials, later),
                         f"names: localhost, 127.0.0.1; expired {expiry} (2 days ago)")

    def test_factory_refuses_bad_files(self):
        """The context factory raises TLSError for files load_server_credentials refuses."""
        with self.assertRaises(TLSError):
            ReloadableServerContextFactory(
                ServerTLSFiles(self.certs.expired_cert, self.certs.expired_key), _now()
            )


class ServerHandshakeTests(_LoopbackTLS, TestCase):
    """The reloadable server context on a real loopback TLS listener."""

    async def test_trusting_client_gets_http11_over_alpn(self):
        """A client trusting the test CA completes the handshake and gets ALPN http/1.1."""
        port, _ = await self.listen(ReloadableServerContextFactory(self.files(), _now()))
        context = self.ssl_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        exchange = await deferToThread(_ssl_exchange, port, context)
        self.assertEqual((exchange.alpn, exchange.echoed), ("http/1.1", b"ping"))
        self.assertEqual(exchange.version, "TLSv1.3")

    async def test_client_without_http11_gets_no_protocol(self):
        """A client offering only other ALPN protocols completes with none selected."""
        port, _ = await self.listen(ReloadableServerContextFactory(self.files(), _now()))
        context = self.ssl_context()
        context.set_alpn_protocols(["h2"])
        exchange = await deferToThread(_ssl_exchange, port, context)
        self.assertEqual((exchange.alpn, exchange.echoed), (None, b"ping"))

    async def test_tls12_client_gets_forward_secret_aead_cipher(self):
        """A TLS 1.2 client is served an ECDHE suite with AES-GCM or ChaCha20."""
        port, _ = await self.listen(ReloadableServerContextFactory(self.files(), _now()))
        context = self.ssl_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        exchange = await deferToThread(_ssl_exchange, port, context)
        self.assertEqual(exchange.version, "TLSv1.2")
        self.assertTrue(exchange.cipher.startswith("ECDHE-"), exchange.cipher)
        self.assertRegex(exchange.cipher, "GCM|CHACHA20")

    async def test_client_not_trusting_ca_fails(self):
        """A client trusting another CA refuses the server's certificate."""
        port, _ = await self.listen(ReloadableServerContextFactory(self.files(), _now()))
        failure = await _failure_of(
            deferToThread(_ssl_exchange, port, self.ssl_context(self.certs.other_ca))
        )
        self.assertIsInstance(failure.value, ssl.SSLCertVerificationError)

    async def test_tls11_client_is_refused(self):
        """A client limited to TLS 1.0/1.1 is refused by the server's TLS 1.2 floor."""
        port, tracking = await self.listen(
            ReloadableServerContextFactory(self.files(), _now())
        )
        context = self.ssl_context()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated: the point here
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        # Let the local OpenSSL offer TLS 1.1 at all, so the refusal is the server's.
        context.set_ciphers("ALL:@SECLEVEL=0")
        failure = await _failure_of(deferToThread(_ssl_exchange, port, context))
        self.assertIsInstance(failure.value, ssl.SSLError)
        await tracking.all_closed()
        [reason] = tracking.reasons
        self.assertIsInstance(reason.value, SSL.Error)
        self.assertIn("unsupported protocol", str(reason.value))

    async def test_reload_serves_new_certificate_to_new_connections_only(self):
        """After reload a new connection gets the new certificate; an open one keeps working."""
        live_cert = f"{self.certs.directory}/live.pem"
        live_key = f"{self.certs.directory}/live.key"
        shutil.copy(self.certs.server_cert, live_cert)
        shutil.copy(self.certs.server_key, live_key)
        factory = ReloadableServerContextFactory(self.files(live_cert, live_key), _now())
        old_serial = factory.credentials.certificate.serial_number
        port, _ = await self.listen(factory)
        first = await self.connect(port, self.trusting())
        await first.handshake

        shutil.copy(self.certs.reloaded_cert, live_cert)
        shutil.copy(self.certs.reloaded_key, live_key)
        reloaded = factory.reload(_now())
        second = await self.connect(port, self.trusting())
        await second.handshake

        self.assertNotEqual(reloaded.certificate.serial_number, old_serial)
        self.assertEqual(second.peer_serial(), reloaded.certificate.serial_number)
        self.assertEqual(first.peer_serial(), old_serial)
        first.transport.write(b"still here")
        self.assertEqual(await first.read(10), b"still here")

    async def test_failed_reload_keeps_old_certificate(self):
        """A reload that fails raises TLSError and new connections get the old certificate."""
        live_cert = f"{self.certs.directory}/live.pem"
        shutil.copy(self.certs.server_cert, live_cert)
        factory = ReloadableServerContextFactory(self.files(live_cert), _now())
        old_serial = factory.credentials.certificate.serial_number
        port, _ = await self.listen(factory)

        shutil.copy(self.certs.reloaded_cert, live_cert)
        with self.assertRaises(TLSError) as raised:
            factory.reload(_now())
        self.assertIn("does not match", str(raised.exception))
        client = await self.connect(port, self.trusting())
        await client.handshake

        self.assertEqual(client.peer_serial(), old_serial)
        self.assertEqual(factory.credentials.certificate.serial_number, old_serial)

    async def test_client_without_certificate_is_refused_when_client_ca_set(self):
        """With a client CA configured, a client sending no certificate is cut off."""
        factory = ReloadableServerContextFactory(self.files(client_ca=self.certs.ca), _now())
        port, tracking = await self.listen(factory)
        client = await self.connect(port, self.trusting())
        client.transport.write(b"ping")

        reason = await client.when_closed()
        await tracking.all_closed()
        self.assertIsInstance(reason, SSL.Error)
        self.assertEqual(client.received, b"")
        self.assertIn("peer did not return a certificate", str(tracking.reasons[0].value))

    async def test_client_with_certificate_is_accepted_when_client_ca_set(self):
        """With a client CA configured, a client certificate signed by it is accepted."""
        factory = ReloadableServerContextFactory(self.files(client_ca=self.certs.ca), _now())
        port, _ = await self.listen(factory)
        client = await self.connect(
            port, self.trusting(client_cert=self.certs.client_cert,
                                client_key=self.certs.client_key)
        )
        await client.handshake
        client.transport.write(b"ping")
        self.assertEqual(await client.read(4), b"ping")


class ClientPolicyTests(_LoopbackTLS, TestCase):
    """client_tls_policy with Agent against a twisted.web site served over TLS."""

    async def serve(self, cert: str, key: str) -> int:
        factory = ReloadableServerContextFactory(ServerTLSFiles(cert, key), _now())
        port, _ = await self.listen(factory, Site(_Hello()))
        return port

    def agent(self, policy) -> Agent:
        # A persistent pool can be closed and waited for; a non-persistent one leaves
        # the client's close unobservable.
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        return Agent(reactor, contextFactory=policy, pool=pool)

    async def get(self, policy, port: int, host: str = "localhost") -> bytes:
        response = await HTTPClient(self.agent(policy)).get(f"https://{host}:{port}/")
        return await response.content()

    async def test_ca_file_policy_gets_page_from_localhost(self):
        """A policy trusting the test CA file fetches a page from https://localhost."""
        port = await self.serve(self.certs.server_cert, self.certs.server_key)
        body = await self.get(client_tls_policy(True, self.certs.ca), port)
        self.assertEqual(body, b"hello")

    async def test_ca_file_policy_checks_ip_address_hosts(self):
        """A URL with an IP address is verified against the certificate's IP SAN."""
        port = await self.serve(self.certs.server_cert, self.certs.server_key)
        body = await self.get(client_tls_policy(True, self.certs.ca), port, "127.0.0.1")
        self.assertEqual(body, b"hello")

    async def test_wrong_host_name_is_refused_with_the_names(self):
        """A certificate for another name is refused, naming both the names and the host."""
        port = await self.serve(self.certs.wrong_host_cert, self.certs.wrong_host_key)
        failure = await _failure_of(self.get(client_tls_policy(True, self.certs.ca), port))
        self.assertEqual(
            describe_tls_failure(failure),
            "TLS: host name mismatch: certificate is for wrong.example, not localhost",
        )

    async def test_other_ca_is_refused_as_unverified(self):
        """A policy trusting another CA refuses the server with the X509 reason."""
        port = await self.serve(self.certs.server_cert, self.certs.server_key)
        failure = await _failure_of(
            self.get(client_tls_policy(True, self.certs.other_ca), port)
        )
        self.assertEqual(
            describe_tls_failure(failure),
            "TLS: certificate verify failed (unable to get local issuer certificate)",
        )

    async def test_system_trust_refuses_test_ca(self):
        """Without a CA file the system store is used, which does not know the test CA."""
        port = await self.serve(self.certs.server_cert, self.certs.server_key)
        failure = await _failure_of(self.get(client_tls_policy(True), port))
        self.assertIn("TLS: certificate verify failed", describe_tls_failure(failure))

    async def test_self_signed_is_refused_when_verifying(self):
        """A self-signed server certificate is refused as such by a verifying policy."""
        port = await self.serve(self.certs.self_signed_cert, self.certs.self_signed_key)
        failure = await _failure_of(self.get(client_tls_policy(True, self.certs.ca), port))
        self.assertEqual(describe_tls_failure(failure),
                         "TLS: certificate verify failed (self-signed certificate)")

    async def test_unverified_policy_accepts_self_signed(self):
        """verify=False fetches the page from a self-signed server."""
        port = await self.serve(self.certs.self_signed_cert, self.certs.self_signed_key)
        self.assertEqual(await self.get(client_tls_policy(False), port), b"hello")

    def test_bad_ca_file_raises_tls_error(self):
        """A missing or certificate-less CA file raises TLSError naming the file."""
        missing = f"{self.certs.directory}/absent-ca.pem"
        with self.assertRaises(TLSError) as raised:
            client_tls_policy(True, missing)
        self.assertEqual(str(raised.exception), f"CA file {missing}: no such file")
        with self.assertRaises(TLSError):
            client_tls_policy(True, self.certs.server_key)


class DescribeTLSFailureTests(TestCase):
    """describe_tls_failure on the exception shapes Twisted produces."""

    def test_unwraps_agent_wrapper_exceptions(self):
        """The TLS reason inside ResponseNeverReceived wins over other wrapped reasons."""
        wrapped = ResponseNeverReceived([
            Failure(TLSVerifyError("certificate verify failed (certificate has expired)")),
        ])
        self.assertEqual(describe_tls_failure(Failure(wrapped)),
                         "TLS: certificate verify failed (certificate has expired)")

    def test_describes_service_identity_mismatch(self):
        """A plain service_identity VerificationError names the host that was looked for."""
        error = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("pydio.example"))])
        self.assertEqual(describe_tls_failure(error),
                         "TLS: host name mismatch: certificate is not for pydio.example")

    def test_describes_openssl_error_queue(self):
        """An OpenSSL error gives the reason strings of its queue."""
        error = SSL.Error([("SSL routines", "", "certificate verify failed")])
        self.assertEqual(describe_tls_failure(Failure(error)),
                         "TLS: certificate verify failed")

    def test_other_errors_are_named_by_type(self):
        """A failure that is not about TLS is described by its type and message."""
        description = describe_tls_failure(Failure(ConnectionRefusedError("no listener")))
        self.assertTrue(description.startswith("ConnectionRefusedError: "), description)
