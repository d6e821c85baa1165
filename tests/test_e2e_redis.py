"""End to end with the Redis broker: two real services joined by a real redis-server."""

from twisted.internet import reactor, task
from twisted.trial import unittest

from pydio_ws.redis_backend import BrokerUnavailable
from tests.redis_server import start_redis
from tests.support import (ServerFixture, connect_browser, post, registered_browser, request, token,
                           wait_until)

WAIT_POLLS = 3000  # wait_until polls every 5 ms: 15 s at most, beyond the first backoff steps


async def broker_state(testcase, server: ServerFixture) -> str:
    status, document = await request(testcase, "GET", f"{server.private_url}/status")
    testcase.assertEqual(status, 200)
    return document["broker"]["state"]


async def until_state(testcase, server: ServerFixture, state: str, polls: int = 300) -> None:
    """Poll /status every 50 ms until the broker shows `state` (15 s at most)."""
    seen = []
    for _ in range(polls):
        seen.append(await broker_state(testcase, server))
        if seen[-1] == state:
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"broker never became {state!r}: last seen {seen[-1]!r}")


async def node(testcase, redis) -> ServerFixture:
    """A service on the redis broker, once its broker is up."""
    server = ServerFixture.start(testcase, broker_url=redis.url)
    await wait_until(lambda: server.service.broker.backend.state == "up", polls=WAIT_POLLS)
    return server


async def subscribed_browser(testcase, server: ServerFixture, repo: str = "1", **token_args):
    """A registered browser, once its node's channel for `repo` is confirmed by Redis."""
    browser = await registered_browser(testcase, server, repo, **token_args)
    await wait_until(lambda: repo in server.service.broker.backend.subscribed_repos, polls=WAIT_POLLS)
    return browser


class MultiNodeDeliveryTests(unittest.TestCase):
    """What reaches which browser when the publisher posts to another node."""

    def setUp(self):
        self.redis = start_redis(self)

    async def test_both_nodes_deliver_exactly_once_in_order(self):
        """A message posted to node A reaches browsers on A and on B once each, in publish order."""
        a, b = await node(self, self.redis), await node(self, self.redis)
        on_a = await subscribed_browser(self, a)
        on_b = await subscribed_browser(self, b)
        for content in ("m1", "m2"):
            self.assertEqual(await post(self, a.private_url, {"REPO_ID": "1", "CONTENT": content}),
                             (200, {"published": 1}))
        await post(self, a.private_url, {"REPO_ID": "AJXP_REPO_SCOPE_ALL", "CONTENT": "m3"})
        for browser in (on_a, on_b):
            self.assertEqual([await browser.next_message() for _ in range(3)], [b"m1", b"m2", b"m3"])

    async def test_filters_apply_on_the_receiving_node(self):
        """Another workspace, user or group is not delivered on node B; the barrier is."""
        a, b = await node(self, self.redis), await node(self, self.redis)
        browser = await subscribed_browser(self, b, "1", user="alice", group="/sales")
        await subscribed_browser(self, a, "2", repos={"2": "r"})
        await post(self, a.private_url, [
            {"REPO_ID": "2", "CONTENT": "other-repo"},
            {"REPO_ID": "1", "CONTENT": "other-user", "USER_ID": "bob"},
            {"REPO_ID": "1", "CONTENT": "other-group", "GROUP_PATH": "/hr"},
            {"REPO_ID": "1", "CONTENT": "barrier", "USER_ID": "alice", "GROUP_PATH": "/sales"}])
        self.assertEqual(await browser.next_message(), b"barrier")
        self.assertEqual(b.service.broker.backend.subscribed_repos, {"1"})

    async def test_unregistered_browser_gets_all_workspace_messages(self):
        """A browser on B that registered nowhere receives AJXP_REPO_SCOPE_ALL posted to A."""
        a, b = await node(self, self.redis), await node(self, self.redis)
        browser = await connect_browser(self, b.public_url(f"?token={token()}"), b.public_port)
        await post(self, a.private_url, [{"REPO_ID": "1", "CONTENT": "skipped"},
                                         {"REPO_ID": "AJXP_REPO_SCOPE_ALL", "CONTENT": "all"}])
        self.assertEqual(await browser.next_message(), b"all")


class RedisFaultTests(unittest.TestCase):
    """Redis stopped and restarted under running services; Redis down when they start."""

    async def test_redis_lost_answers_503_and_recovers(self):
        """Redis lost: 503 and /status "down"; back: "up", and B's browser receives without re-registering."""
        redis = start_redis(self)
        a, b = await node(self, redis), await node(self, redis)
        browser = await subscribed_browser(self, b)
        redis.stop()
        await until_state(self, a, "down")
        status, body = await post(self, a.private_url, {"REPO_ID": "1", "CONTENT": "lost"})
        self.assertEqual((status, body), (503, {"error": "broker unavailable"}))
        self.assertEqual(len(self.flushLoggedErrors(BrokerUnavailable)), 1)
        redis.start()
        await until_state(self, a, "up")
        await until_state(self, b, "up")
        self.assertEqual(await post(self, a.private_url, {"REPO_ID": "1", "CONTENT": "back"}),
                         (200, {"published": 1}))
        self.assertEqual(await browser.next_message(), b"back")

    async def test_redis_down_at_start(self):
        """A service started before Redis runs: /status "connecting" and 503, then "up" and 200."""
        redis = start_redis(self, start=False)
        server = ServerFixture.start(self, broker_url=redis.url)
        self.assertEqual(await broker_state(self, server), "connecting")
        status, _ = await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "early"})
        self.assertEqual(status, 503)
        self.flushLoggedErrors(BrokerUnavailable)
        redis.start()
        await until_state(self, server, "up")
        browser = await subscribed_browser(self, server)
        await post(self, server.private_url, {"REPO_ID": "1", "CONTENT": "on-time"})
        self.assertEqual(await browser.next_message(), b"on-time")
