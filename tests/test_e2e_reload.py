"""SIGHUP reload: the configuration file is re-read and applied without dropping anyone."""

import os

from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from pydio_ws.config import load_config
from pydio_ws.service import PydioWSService
from tests.support import (ServerFixture, connect_browser, handshake_status, post, temp_dir,
                           token, wait_until, ws_handshake)

OLD_KEY = "reload-test-old-key-0123456789abcdef"
NEW_KEY = "reload-test-new-key-0123456789abcdef"


class ReloadTests(unittest.TestCase):
    """A running service applies a changed file on reload."""

    def setUp(self):
        self.directory = temp_dir(self)
        self.path = os.path.join(self.directory, "pydio-ws.ini")
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def write(self, key=OLD_KEY, **extra):
        sections = {
            "public": {"host": "127.0.0.1", "port": "0"},
            "private": {"host": "127.0.0.1", "port": "0", "key": key,
                        "generated_key_file": os.path.join(self.directory, "generated.key")},
        }
        for name, value in extra.items():
            section, _, option = name.partition("_")
            sections.setdefault(section, {})[option] = value
        with open(self.path, "w", encoding="utf-8") as stream:
            for section, values in sections.items():
                stream.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))

    def start(self):
        service = PydioWSService(load_config(self.path, environ={}), reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return ServerFixture(service)

    def logged(self, text):
        return [event for event in self.events if text in str(event.get("log_format", ""))]

    async def test_new_key_applies_and_open_connections_keep_receiving(self):
        """After reload the new key publishes and the old one is refused; an old socket stays."""
        self.write(OLD_KEY)
        server = self.start()
        browser = await connect_browser(self, server.public_url(f"?token={token(key=OLD_KEY)}"),
                                        server.public_port)
        browser.say("register:1")
        await wait_until(lambda: server.service.broker.registered_counts() == {"1": 1})
        self.write(NEW_KEY)
        server.service.reload()
        message = {"REPO_ID": "1", "CONTENT": "after reload"}
        self.assertEqual((await post(self, server.private_url, message, key=OLD_KEY))[0], 401)
        self.assertEqual((await post(self, server.private_url, message, key=NEW_KEY))[0], 200)
        self.assertEqual(await browser.next_message(), b"after reload")

    async def test_invalid_file_is_rejected_whole(self):
        """A file with one bad value changes nothing, and says why in one log event."""
        self.write(OLD_KEY)
        server = self.start()
        self.write(NEW_KEY, limits_max_connections="many")
        server.service.reload()
        self.assertEqual(len(self.logged("configuration reload rejected")), 1)
        message = {"REPO_ID": "1", "CONTENT": "x"}
        self.assertEqual((await post(self, server.private_url, message, key=OLD_KEY))[0], 200)
        self.assertEqual((await post(self, server.private_url, message, key=NEW_KEY))[0], 401)

    async def test_restart_only_keys_are_reported_and_not_applied(self):
        """A changed path is reported as needing a restart; browsers keep the old path."""
        self.write(OLD_KEY)
        server = self.start()
        self.write(OLD_KEY, public_path="/elsewhere")
        server.service.reload()
        [warning] = self.logged("only after a restart")
        self.assertIn("public.path", warning["keys"])
        request = ws_handshake(f"/public?token={token(key=OLD_KEY)}", server.public_port)
        self.assertEqual(await handshake_status(server.public_port, request), 101)

    async def test_allowed_origins_apply_to_new_handshakes(self):
        """A newly restricted origin list refuses the next handshake from another origin."""
        self.write(OLD_KEY)
        server = self.start()
        self.write(OLD_KEY, public_allowed_origins="https://pydio.example")
        server.service.reload()
        request = ws_handshake(f"/public?token={token(key=OLD_KEY)}", server.public_port,
                               {"Origin": "https://evil.example"})
        self.assertEqual(await handshake_status(server.public_port, request), 403)
