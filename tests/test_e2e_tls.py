"""End to end over real TLS: wss:// browsers, https publishers, verified calls to Pydio."""

import shutil
from datetime import datetime, timezone

import treq
from twisted.internet import reactor, ssl
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from pydio_ws.service import Options
from pydio_ws.tls import ReloadableServerContextFactory, ServerTLSFiles
from tests.certs import make_test_certs
from tests.fake_pydio import FakePydio, Reply, registry
from tests.legacy_publisher import (legacy_frame, legacy_handshake, legacy_publish, php_message,
                                    stray_bytes)
from tests.support import (KEY, ServerFixture, connect_browser, handshake_status, post, status_of,
                           temp_dir, token, wait_until, ws_handshake)


def trusting(ca_path: str, client_cert: str = "", client_key: str = ""):
    """Client TLS options for "localhost" that trust `ca_path` (and present a client cert)."""
    with open(ca_path, "rb") as stream:
        authority = ssl.Certificate.loadPEM(stream.read())
    extra = {}
    if client_cert:
        with open(client_cert, "rb") as cert, open(client_key, "rb") as key:
            extra["clientCertificate"] = ssl.PrivateCertificate.loadPEM(cert.read() + key.read())
    return ssl.optionsForClientTLS("localhost", trustRoot=authority, **extra)


@implementer(IPolicyForHTTPS)
class _Policy:
    def __init__(self, options):
        self._options = options

    def creatorForNetloc(self, hostname, port):
        return self._options


def https_client(testcase, options):
    pool = HTTPConnectionPool(reactor, persistent=False)
    return treq.client.HTTPClient(Agent(reactor, contextFactory=_Policy(options), pool=pool))


class LogCapture:
    """Collects log events emitted during a test."""

    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def reasons(self):
        return " | ".join(str(event.get("reason", "")) for event in self.events)


class SecureBrowserTests(unittest.TestCase):
    """wss:// for browsers."""

    def setUp(self):
        self.certs = make_test_certs(self)

    def start(self, **settings):
        return ServerFixture.start(self, public_ssl="true", public_ssl_cert=self.certs.server_cert,
                                   public_ssl_key=self.certs.server_key, **settings)

    async def test_trusting_client_receives_messages(self):
        """A wss:// client that trusts the CA registers and receives a message."""
        server = self.start(shared=False)
        browser = await connect_browser(self, f"wss://localhost:{server.public_port}/public?token={token()}",
                                        server.public_port, tls=trusting(self.certs.ca))
        browser.say("register:1")
        await wait_registered(server, "1")
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "secure"})
        self.assertEqual(await browser.next_message(), b"secure")

    async def test_untrusting_client_fails_the_tls_handshake(self):
        """A client that does not trust the CA cannot open the socket."""
        server = self.start()
        with self.assertRaises(Exception):
            await connect_browser(self, f"wss://localhost:{server.public_port}/public?token={token()}",
                                  server.public_port, tls=trusting(self.certs.other_ca))

    async def test_reload_swaps_certificate_and_keeps_connections(self):
        """After reload, new handshakes get the new certificate; an open socket keeps receiving."""
        directory = temp_dir(self)
        cert, key = f"{directory}/cert.pem", f"{directory}/key.pem"
        shutil.copy(self.certs.server_cert, cert)
        shutil.copy(self.certs.server_key, key)
        server = ServerFixture.start(self, shared=False, public_ssl="true", public_ssl_cert=cert,
                                     public_ssl_key=key)
        url = f"wss://localhost:{server.public_port}/public?token={token()}"
        before = await connect_browser(self, url, server.public_port, tls=trusting(self.certs.ca))
        shutil.copy(self.certs.reloaded_cert, cert)
        shutil.copy(self.certs.reloaded_key, key)
        server.service.reload()
        after = await connect_browser(self, url, server.public_port, tls=trusting(self.certs.ca))
        self.assertNotEqual(serial(before), serial(after))
        before.say("register:1")
        await wait_registered(server, "1")
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "still here"})
        self.assertEqual(await before.next_message(), b"still here")

    async def test_failed_reload_keeps_old_certificate(self):
        """A reload with a broken key file logs why and keeps serving the old certificate."""
        directory = temp_dir(self)
        cert, key = f"{directory}/cert.pem", f"{directory}/key.pem"
        shutil.copy(self.certs.server_cert, cert)
        shutil.copy(self.certs.server_key, key)
        server = ServerFixture.start(self, public_ssl="true", public_ssl_cert=cert, public_ssl_key=key)
        url = f"wss://localhost:{server.public_port}/public?token={token()}"
        first = await connect_browser(self, url, server.public_port, tls=trusting(self.certs.ca))
        shutil.copy(self.certs.mismatched_key, key)
        logs = LogCapture(self)
        server.service.reload()
        self.assertIn("does not match", logs.reasons())
        second = await connect_browser(self, url, server.public_port, tls=trusting(self.certs.ca))
        self.assertEqual(serial(first), serial(second))

    def test_bad_files_stop_startup_with_one_line(self):
        """A mismatched key, an expired certificate or a missing file is a usage error."""
        for cert, key, expected in (
                (self.certs.server_cert, self.certs.mismatched_key, "does not match"),
                (self.certs.expired_cert, self.certs.expired_key, "expired"),
                ("/nonexistent/cert.pem", self.certs.server_key, "/nonexistent/cert.pem")):
            with self.assertRaises(usage.UsageError) as raised:
                Options().parseOptions(["--public-ssl", "true", "--public-ssl-cert", cert,
                                        "--public-ssl-key", key])
            self.assertIn(expected, str(raised.exception))
            self.assertNotIn("\n", str(raised.exception))


class SecurePrivateSideTests(unittest.TestCase):
    """https for the publisher, with optional client certificates."""

    def setUp(self):
        self.certs = make_test_certs(self)

    def start(self, **settings):
        return ServerFixture.start(self, shared=False, private_ssl="true",
                                   private_ssl_cert=self.certs.server_cert,
                                   private_ssl_key=self.certs.server_key, **settings)

    async def publish(self, server, options):
        response = await https_client(self, options).post(
            f"https://localhost:{server.private_port}/private",
            data=b'{"REPO_ID": "1", "CONTENT": "over https"}', headers={"X-Pydio-Key": [KEY]})
        return response.code, await response.content()

    async def test_https_publish_with_key(self):
        """A POST over https with the key is published."""
        server = self.start()
        status, _ = await self.publish(server, trusting(self.certs.ca))
        self.assertEqual(status, 200)

    async def test_client_certificate_is_required_when_configured(self):
        """With ssl_client_ca, a publisher without a certificate fails; with one it succeeds."""
        server = self.start(private_ssl_client_ca=self.certs.ca)
        with self.assertRaises(Exception):
            await self.publish(server, trusting(self.certs.ca))
        status, _ = await self.publish(
            server, trusting(self.certs.ca, self.certs.client_cert, self.certs.client_key))
        self.assertEqual(status, 200)


class VerifiedPydioHostTests(unittest.TestCase):
    """Cookie authentication against an https Pydio host is verified."""

    def setUp(self):
        self.certs = make_test_certs(self)

    async def pydio_host(self, cert, key):
        fake = FakePydio(reactor)
        context = ReloadableServerContextFactory(ServerTLSFiles(cert, key), now())
        url = await fake.start(tls=context, host="localhost")
        self.addCleanup(fake.stop)
        fake.replies["sid=alice"] = Reply(registry("alice", None, {"1": "rw"}))
        return url

    async def browser_status(self, url, **settings):
        server = ServerFixture.start(self, auth_mode="pydio", auth_pydio_url=url, **settings)
        try:
            await connect_browser(self, server.public_url(), server.public_port,
                                  headers={"Cookie": "sid=alice"})
        except ConnectionError as error:
            return str(error)
        return "open"

    async def test_trusted_ca_file_accepts_the_host(self):
        """With ca_file naming the CA, the browser is authenticated over https."""
        url = await self.pydio_host(self.certs.server_cert, self.certs.server_key)
        self.assertEqual(await self.browser_status(url, auth_ca_file=self.certs.ca), "open")

    async def test_wrong_host_name_is_503_with_reason(self):
        """A certificate for another name is refused: 503, and the log names the mismatch."""
        url = await self.pydio_host(self.certs.wrong_host_cert, self.certs.wrong_host_key)
        logs = LogCapture(self)
        status = await self.browser_status(url, auth_ca_file=self.certs.ca)
        self.assertIn("503", status)
        self.assertIn("wrong.example", logs.reasons())

    async def test_untrusted_ca_is_503_with_reason(self):
        """A certificate from a CA the server does not trust is refused with 503."""
        url = await self.pydio_host(self.certs.server_cert, self.certs.server_key)
        logs = LogCapture(self)
        status = await self.browser_status(url)
        self.assertIn("503", status)
        self.assertIn("verify failed", logs.reasons())


def now():
    return datetime.now(timezone.utc)


def serial(browser) -> int:
    """The serial number of the certificate the server presented to `browser`."""
    return browser.transport.getPeerCertificate().get_serial_number()


async def wait_registered(server, repo):
    await wait_until(lambda: server.service.broker.registered_counts().get(repo) == 1)


class PlainPublisherOnTLSListenerTests(unittest.TestCase):
    """Pydio 6 publishes in plain ws:// to the port its browsers reach with wss://."""

    def setUp(self):
        self.certs = make_test_certs(self)

    def start(self, **settings):
        return ServerFixture.start(self, public_path="/ws", private_path="/ws", public_ssl="true",
                                   public_ssl_cert=self.certs.server_cert,
                                   public_ssl_key=self.certs.server_key, **settings)

    async def test_plain_legacy_publisher_reaches_wss_browser(self):
        """With private.ssl false, a plain legacy publisher on the TLS port reaches a wss browser."""
        server = self.start()
        browser = await connect_browser(self, f"wss://localhost:{server.public_port}/ws?token={token()}",
                                        server.public_port, tls=trusting(self.certs.ca))
        browser.say("register:1")
        await wait_registered(server, "1")
        head = legacy_handshake("127.0.0.1", server.public_port, "/ws", KEY)
        answer = await legacy_publish(server.public_port, head, stray_bytes(),
                                      legacy_frame(php_message("plain publisher")))
        self.assertEqual(status_of(answer), 101)
        self.assertEqual(await browser.next_message(), b"plain publisher")

    async def test_plain_browser_is_refused(self):
        """A plain-text browser handshake on the TLS port is not served as a browser."""
        server = self.start()
        request = ws_handshake(f"/ws?token={token()}", server.public_port)
        self.assertEqual(await handshake_status(server.public_port, request), 401)

    async def test_private_ssl_true_means_tls_only(self):
        """With private.ssl true as well, a plain publisher gets no HTTP answer at all."""
        server = self.start(private_ssl="true", private_ssl_cert=self.certs.server_cert,
                            private_ssl_key=self.certs.server_key)
        head = legacy_handshake("127.0.0.1", server.public_port, "/ws", KEY)
        answer = await legacy_publish(server.public_port, head, stray_bytes(), b"")
        self.assertFalse(answer.startswith(b"HTTP/1.1"))


class StartupWarningTests(unittest.TestCase):
    """Risky TLS situations are logged when the service starts."""

    def setUp(self):
        self.certs = make_test_certs(self)
        self.logs = LogCapture(self)

    def formats(self):
        return " | ".join(str(event.get("log_format", "")) for event in self.logs.events)

    def test_certificate_expiring_within_14_days_is_warned(self):
        """A certificate that expires in 5 days starts, with a warning naming it."""
        ServerFixture.start(self, public_ssl="true", public_ssl_cert=self.certs.expiring_cert,
                            public_ssl_key=self.certs.expiring_key)
        self.assertIn("certificate expires soon", self.formats())

    async def test_verify_ssl_false_is_warned_and_accepts_self_signed(self):
        """verify_ssl = false logs a warning, and a self-signed Pydio host is then accepted."""
        fake = FakePydio(reactor)
        context = ReloadableServerContextFactory(
            ServerTLSFiles(self.certs.self_signed_cert, self.certs.self_signed_key), now())
        url = await fake.start(tls=context, host="localhost")
        self.addCleanup(fake.stop)
        fake.replies["sid=alice"] = Reply(registry("alice", None, {"1": "rw"}))
        server = ServerFixture.start(self, auth_mode="pydio", auth_pydio_url=url, auth_verify_ssl="false")
        self.assertIn("is not verified", self.formats())
        browser = await connect_browser(self, server.public_url(), server.public_port,
                                        headers={"Cookie": "sid=alice"})
        self.assertEqual(browser.state, browser.STATE_OPEN)
