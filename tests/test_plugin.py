"""Tests for the twistd plugin: discovery, options, and `twistd -n pydio-ws` as a process."""

import os
import signal
import socket
import sys

from twisted.application.service import IServiceMaker
from twisted.internet import defer, error, protocol, reactor
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial import unittest

from pydio_ws.collector import YOUNG_COLLECTION_THRESHOLD
from pydio_ws.service import Options
from tests.support import KEY, connect_browser, post, request, temp_dir, token

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
PROCESS_TIMEOUT = 60


class PluginTests(unittest.TestCase):
    """The plugin as twistd sees it."""

    def test_plugin_is_discoverable(self):
        """getPlugins(IServiceMaker) yields a maker with tapname "pydio-ws" and our Options."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("pydio-ws", makers)
        self.assertIs(makers["pydio-ws"].options, Options)

    def test_options_reject_bad_port(self):
        """--public-port 99999 is a UsageError naming public.port."""
        with self.assertRaises(usage.UsageError) as caught:
            Options().parseOptions(["--public-port", "99999"])
        self.assertIn("public.port", str(caught.exception))

    def test_options_build_config(self):
        """Long options become the frozen Config, above the defaults."""
        options = Options()
        options.parseOptions(["--public-host", "127.0.0.1", "--public-port", "0",
                              "--private-port", "0", "--private-path", "/push"])
        config = options.config
        self.assertEqual((config.public.host, config.public.port, config.private.path),
                         ("127.0.0.1", 0, "/push"))


class TwistdProcess(protocol.ProcessProtocol):
    """Collects a twistd child's output; `seen(marker)` fires once the output contains it."""

    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()
        self._waiting = []

    def seen(self, marker: bytes):
        waiting = defer.Deferred()
        self._waiting.append((marker, waiting))
        self._check()
        return waiting

    def _check(self):
        for marker, waiting in list(self._waiting):
            if marker in self.output:
                self._waiting.remove((marker, waiting))
                waiting.callback(None)

    def outReceived(self, data):
        self.output += data
        self._check()

    errReceived = outReceived

    def processEnded(self, reason):
        self.exit_code = reason.value.exitCode
        self.signal = reason.value.signal
        for marker, waiting in self._waiting:
            waiting.errback(AssertionError(f"twistd ended before printing {marker!r}:\n"
                                           + self.output.decode("utf-8", "replace")))
        self._waiting = []
        self.ended.callback(self.exit_code)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TwistdTests(unittest.TestCase):
    """`twistd -n pydio-ws` in a child process."""

    def spawn(self, *arguments: str) -> TwistdProcess:
        """Start twistd in a temp directory; it is killed on cleanup if still running."""
        directory = temp_dir(self)
        environ = {name: value for name, value in os.environ.items() if not name.startswith("PYDIO_WS_")}
        environ.update({
            "PYTHONPATH": os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])),
            "PYDIO_WS_PRIVATE_KEY": KEY,
            "PYDIO_WS_PRIVATE_GENERATED_KEY_FILE": os.path.join(directory, "generated.key"),
        })
        child = TwistdProcess()
        transport = reactor.spawnProcess(
            child, sys.executable, [sys.executable, TWISTD, "-n", "--pidfile=", "pydio-ws"] + list(arguments),
            env=environ, path=directory)
        child.ended.addTimeout(PROCESS_TIMEOUT, reactor)
        self.addCleanup(self._reap, transport, child)
        return child

    async def _reap(self, transport, child):
        if not child.ended.called:
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
            try:
                await child.ended
            except defer.TimeoutError:
                pass

    def listen_on(self, port: int):
        return ["--public-host", "127.0.0.1", "--public-port", str(port),
                "--private-host", "127.0.0.1", "--private-port", str(port)]

    async def test_runs_serves_and_stops_on_sigterm(self):
        """twistd -n pydio-ws listens, delivers a publish to a browser, and shuts down cleanly on SIGTERM."""
        port = free_port()
        child = self.spawn(*self.listen_on(port))
        await child.seen(b"starting on %d" % port).addTimeout(PROCESS_TIMEOUT, reactor)
        browser = await connect_browser(self, f"ws://127.0.0.1:{port}/public?token={token()}", port)
        status, body = await post(self, f"http://127.0.0.1:{port}/private",
                                  {"REPO_ID": "*", "CONTENT": "from-twistd"})
        self.assertEqual((status, body), (200, {"published": 1}))
        self.assertEqual(await browser.next_message(), b"from-twistd")
        status, body = await request(self, "GET", f"http://127.0.0.1:{port}/private/status")
        self.assertEqual(status, 200)
        # The process's start-up objects are frozen out of the cycle collector's reach.
        self.assertGreater(body["collector"]["frozen_objects"], 10_000)
        self.assertEqual(body["collector"]["thresholds"][0], YOUNG_COLLECTION_THRESHOLD)
        await browser.close()
        child.transport.signalProcess("TERM")
        await child.ended
        # twistd re-raises the signal it stopped on, so the exit status is "killed by SIGTERM".
        self.assertIn((child.exit_code, child.signal), ((0, None), (None, signal.SIGTERM)))
        self.assertIn(b"Server Shut Down", child.output)
        self.assertNotIn(KEY.encode(), child.output)

    async def test_bad_config_value_exits_with_one_line(self):
        """--public-port 99999 makes twistd exit non-zero with one line naming public.port."""
        child = self.spawn("--public-port", "99999")
        self.assertNotEqual(await child.ended, 0)
        lines = [line for line in child.output.decode().splitlines() if "public.port" in line]
        self.assertEqual(len(lines), 1, child.output)
        self.assertIn("port 99999 is out of range 0-65535", lines[0])

    async def test_port_in_use_stops_startup(self):
        """A port already in use makes twistd exit non-zero naming the address."""
        port = self.occupied_port()
        child = self.spawn(*self.listen_on(port))
        self.assertNotEqual(await child.ended, 0)
        self.assertIn(b"127.0.0.1:%d" % port, child.output)
        self.assertIn(b"Address already in use", child.output)

    async def test_port_in_use_is_reported_in_one_line(self):
        """A port already in use is reported by one line, without a Python traceback."""
        port = self.occupied_port()
        child = self.spawn(*self.listen_on(port))
        self.assertNotEqual(await child.ended, 0)
        self.assertNotIn(b"Traceback", child.output)
        lines = [line for line in child.output.decode().splitlines() if "already in use" in line]
        self.assertEqual(len(lines), 1, child.output)

    def occupied_port(self) -> int:
        blocker = socket.socket()
        self.addCleanup(blocker.close)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        return blocker.getsockname()[1]
