"""Tests for pydio_ws.cli: the token, publish and check-config commands."""

import contextlib
import io
import os
import socket
import time

import jwt
from twisted.internet import threads
from twisted.trial import unittest

from pydio_ws.auth import TokenAuthenticator
from pydio_ws.cli import DEFAULT_TTL, main
from tests.certs import make_test_certs
from tests.support import KEY, ServerFixture, registered_browser, temp_dir


def run(argv):
    """Run the CLI; return (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def write_config(testcase, text: str) -> str:
    path = os.path.join(temp_dir(testcase), "pydio-ws.ini")
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(text)
    return path


def key_config(testcase, key: str = KEY, **private) -> str:
    lines = ["[private]", f"key = {key}"] + [f"{name} = {value}" for name, value in private.items()]
    return write_config(testcase, "\n".join(lines) + "\n")


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TokenCommandTests(unittest.TestCase):
    """pydio-ws token."""

    def test_token_is_accepted_by_the_server_authenticator(self):
        """The printed JWT identifies the user, group and repos, with acl "r" by default."""
        code, out, err = run(["token", "--user", "alice", "--group", "/sales", "--repo", "1",
                              "--repo", "2:rw", "--config", key_config(self)])
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(len(out.splitlines()), 1)
        identity = TokenAuthenticator(lambda: KEY).identify(out.strip())
        self.assertEqual((identity.user_id, identity.group_path, dict(identity.repos)),
                         ("alice", "/sales", {"1": "r", "2": "rw"}))

    def test_default_ttl_is_one_hour(self):
        """Without --ttl the token expires one hour from now; --ttl changes it."""
        config = key_config(self)
        for argv, ttl in (([], DEFAULT_TTL), (["--ttl", "60"], 60)):
            before = time.time()
            _, out, _ = run(["token", "--user", "alice", "--repo", "1", "--config", config] + argv)
            exp = jwt.decode(out.strip(), KEY, algorithms=["HS256"])["exp"]
            self.assertTrue(before + ttl - 1 <= exp <= time.time() + ttl)

    def test_token_uses_key_file(self):
        """With key_file configured the token is signed with the file's key."""
        directory = temp_dir(self)
        key_file = os.path.join(directory, "key")
        with open(key_file, "w", encoding="utf-8") as stream:
            stream.write("file-key-0123456789abcdef0123456789\n")
        config = write_config(self, f"[private]\nkey_file = {key_file}\n")
        _, out, _ = run(["token", "--user", "alice", "--repo", "1", "--config", config])
        identity = TokenAuthenticator(lambda: "file-key-0123456789abcdef0123456789").identify(out.strip())
        self.assertEqual(identity.user_id, "alice")

    def test_token_uses_the_generated_key_like_the_server(self):
        """Without a configured key the token is signed with the generated key file's key."""
        generated = os.path.join(temp_dir(self), "generated.key")
        config = write_config(self, f"[private]\ngenerated_key_file = {generated}\n")
        _, out, _ = run(["token", "--user", "alice", "--repo", "1", "--config", config])
        with open(generated, encoding="utf-8") as stream:
            key = stream.read().strip()
        self.assertEqual(TokenAuthenticator(lambda: key).identify(out.strip()).user_id, "alice")


class CheckConfigTests(unittest.TestCase):
    """pydio-ws check-config."""

    def test_good_file(self):
        """A valid file exits 0 and says OK."""
        code, out, err = run(["check-config", key_config(self)])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("OK", out)

    def test_bad_file(self):
        """An invalid file exits 2 with one line on stderr naming the key."""
        code, out, err = run(["check-config", write_config(self, "[public]\nport = 70000\n")])
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("public.port", err)

    def test_missing_file(self):
        """A file that does not exist exits 2 with one line on stderr."""
        missing = os.path.join(temp_dir(self), "absent.ini")
        code, _, err = run(["check-config", missing])
        self.assertEqual(code, 2)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn(missing, err)


    def test_tls_files_are_checked_and_described(self):
        """check-config prints each certificate's names and expiry, and refuses a key that
        does not match its certificate with one line."""
        certs = make_test_certs(self)
        good = write_config(self, f"[public]\nssl = true\nssl_cert = {certs.server_cert}\n"
                                  f"ssl_key = {certs.server_key}\n")
        code, out, err = run(["check-config", good])
        self.assertEqual((code, err), (0, ""))
        self.assertIn("public certificate: names: localhost, 127.0.0.1", out)
        self.assertIn("expires", out)
        bad = write_config(self, f"[public]\nssl = true\nssl_cert = {certs.server_cert}\n"
                                 f"ssl_key = {certs.mismatched_key}\n")
        code, out, err = run(["check-config", bad])
        self.assertEqual((code, out), (2, ""))
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("does not match", err)

    def test_conflicting_tls_on_a_shared_listener(self):
        """On one shared listener, different private TLS files are a configuration error."""
        certs = make_test_certs(self)
        config = write_config(self, f"[public]\nssl = true\nssl_cert = {certs.server_cert}\n"
                                    f"ssl_key = {certs.server_key}\n[private]\nssl = true\n"
                                    f"ssl_cert = {certs.reloaded_cert}\nssl_key = {certs.reloaded_key}\n")
        code, _, err = run(["check-config", config])
        self.assertEqual(code, 2)
        self.assertIn("private.ssl_cert conflicts with public.ssl_cert", err)


class PublishCommandTests(unittest.TestCase):
    """pydio-ws publish against a real server."""

    def publish(self, config: str, *argv: str):
        """Run the blocking publish command in a thread while the reactor serves."""
        return threads.deferToThread(run, ["publish", "--config", config] + list(argv))

    def server_config(self, server, key: str = KEY) -> str:
        return key_config(self, key, host="127.0.0.1", port=server.private_port,
                          path=server.private_path)

    async def test_publish_reaches_browser(self):
        """publish exits 0, prints the server's reply and the registered browser gets the content."""
        server = ServerFixture.start(self)
        browser = await registered_browser(self, server, "1", user="alice", group="/sales")
        code, out, err = await self.publish(self.server_config(server), "--repo", "1", "--content",
                                            "<tree/>", "--user", "alice", "--group", "/sales")
        self.assertEqual((code, out, err), (0, '{"published": 1}\n', ""))
        self.assertEqual(await browser.next_message(), b"<tree/>")

    async def test_publish_over_https(self):
        """With a TLS private listener, publish uses https and verifies it with --ca-file."""
        certs = make_test_certs(self)
        server = ServerFixture.start(self, shared=False, private_ssl="true",
                                     private_ssl_cert=certs.server_cert, private_ssl_key=certs.server_key)
        config = write_config(self, f"[private]\nhost = localhost\nport = {server.private_port}\n"
                                    f"key = {KEY}\nssl = true\nssl_cert = {certs.server_cert}\n"
                                    f"ssl_key = {certs.server_key}\n")
        code, out, _ = await self.publish(config, "--repo", "1", "--content", "x", "--ca-file", certs.ca)
        self.assertEqual((code, out), (0, '{"published": 1}\n'))
        code, _, err = await self.publish(config, "--repo", "1", "--content", "x")
        self.assertEqual(code, 1)
        self.assertIn("https://localhost", err)

    async def test_publish_with_wrong_key(self):
        """publish with the wrong key exits 1 and reports the 401 on stderr."""
        server = ServerFixture.start(self)
        code, out, err = await self.publish(self.server_config(server, "not-the-key"),
                                            "--repo", "1", "--content", "x")
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("pydio-ws: 401"), err)
        self.assertEqual(server.service.stats.received, 0)

    async def test_publish_to_nothing(self):
        """publish to a port where nothing listens exits 1 saying it cannot reach the URL."""
        port = free_port()
        config = key_config(self, host="127.0.0.1", port=port)
        code, out, err = await threads.deferToThread(
            run, ["publish", "--config", config, "--repo", "1", "--content", "x"])
        self.assertEqual((code, out), (1, ""))
        self.assertIn(f"cannot reach http://127.0.0.1:{port}/private", err)

    def test_publish_without_key_creates_none(self):
        """publish with no key anywhere exits 2 and does not generate a key."""
        generated = os.path.join(temp_dir(self), "generated.key")
        config = write_config(self, f"[private]\ngenerated_key_file = {generated}\n")
        code, out, err = run(["publish", "--config", config, "--repo", "1", "--content", "x"])
        self.assertEqual((code, out), (2, ""))
        self.assertIn(generated, err)
        self.assertFalse(os.path.exists(generated))
