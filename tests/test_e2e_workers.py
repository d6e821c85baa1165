"""Several worker processes on one port, joined by a real redis-server."""

from twisted.internet import reactor, task
from twisted.trial import unittest

from tests.redis_server import start_redis
from tests.support import ServerFixture, connect_browser, post, token, wait_until

BROWSERS = 16


class WorkersTests(unittest.TestCase):
    """`server.workers = 2`: two processes share the listener and deliver exactly once."""

    async def test_two_workers_share_the_port_and_deliver_exactly_once(self):
        """Browsers spread over both processes; each gets every message once, in order."""
        redis = start_redis(self)
        server = ServerFixture.start(self, broker_url=redis.url, server_workers="2")
        await server.service.getServiceNamed("workers").ready()
        await wait_until(lambda: server.service.broker.backend.state == "up", polls=3000)
        browsers = []
        for _ in range(BROWSERS):
            browser = await connect_browser(self, server.public_url(f"?token={token()}"), server.public_port)
            browser.say("register:1")
            browsers.append(browser)
        received = {id(browser): [] for browser in browsers}
        await self.until_every_browser_got_a_probe(server, browsers, received)
        self.assertLess(server.service.broker.attached_count, BROWSERS,
                        "every browser landed on worker 0: the other worker served nothing")
        for index in range(5):
            await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": f"m{index}"})
        for browser in browsers:
            messages = await self.read_until(browser, b"m4", received[id(browser)])
            self.assertEqual([m for m in messages if m.startswith(b"m")], [b"m0", b"m1", b"m2", b"m3", b"m4"])
            probes = [m for m in messages if m.startswith(b"probe")]
            self.assertEqual(len(probes), len(set(probes)), "a probe was delivered twice")

    async def until_every_browser_got_a_probe(self, server, browsers, received):
        """Publish probes until every browser (on either worker) has received one."""
        for attempt in range(300):
            await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": f"probe{attempt}"})
            await task.deferLater(reactor, 0.05, lambda: None)
            for browser in browsers:
                while browser.received.pending:
                    received[id(browser)].append(browser.received.pending.pop(0))
            if all(received[id(browser)] for browser in browsers):
                return
        raise AssertionError("some browsers never received a probe")

    async def read_until(self, browser, last: bytes, seen: list) -> list:
        while last not in seen:
            seen.append(await browser.next_message())
        return seen
