"""Tests for pydio_ws.gate: which peers with which key may publish."""

import ipaddress

from twisted.internet.task import Clock
from twisted.trial import unittest

from pydio_ws.auth import AuthError
from pydio_ws.gate import PublisherGate, carries_publisher_key, presented_key
from pydio_ws.limits import FailureLimiter

KEY = "gate-test-private-key-0123456789"
NETWORKS = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
            ipaddress.ip_network("::1/128"))


def gate(networks=NETWORKS, key=KEY, clock=None, proxies=()) -> PublisherGate:
    limiter = FailureLimiter(clock or Clock(), max_failures=3, window=60)
    return PublisherGate(lambda: networks, lambda: key, limiter, lambda: proxies)


class GateTests(unittest.TestCase):
    """PublisherGate.check: host first (403), then key (401)."""

    def assertRefused(self, peer, headers, status, reason):
        with self.assertRaises(AuthError) as caught:
            gate().check(peer, headers)
        self.assertEqual((caught.exception.status, caught.exception.reason), (status, reason))

    def test_authorized_host_with_key_passes(self):
        """An authorized peer with the right X-Pydio-Key passes."""
        self.assertIsNone(gate().check("127.0.0.1", {"x-pydio-key": KEY}))

    def test_host_is_checked_before_key(self):
        """An unauthorized peer is 403 whether its key is right, wrong or missing."""
        for headers in ({"x-pydio-key": KEY}, {"x-pydio-key": "wrong"}, {}):
            self.assertRefused("192.0.2.1", headers, 403, "host 192.0.2.1 is not authorized to publish")

    def test_missing_key(self):
        """An authorized peer without key is 401 "missing private key"."""
        self.assertRefused("127.0.0.1", {}, 401, "missing private key")

    def test_wrong_key(self):
        """An authorized peer with a wrong key is 401 "wrong private key"."""
        self.assertRefused("127.0.0.1", {"x-pydio-key": KEY + "x"}, 401, "wrong private key")
        self.assertRefused("127.0.0.1", {"x-pydio-key": "é"}, 401, "wrong private key")

    def test_key_headers(self):
        """The key is accepted from X-Pydio-Key, legacy Admin-Key and Authorization: Bearer."""
        for headers in ({"x-pydio-key": KEY}, {"admin-key": f" {KEY} "},
                        {"authorization": f"Bearer {KEY}"}, {"authorization": f"bearer {KEY}"}):
            gate().check("127.0.0.1", headers)
            self.assertEqual(presented_key(headers), KEY)

    def test_other_authorization_schemes_are_no_key(self):
        """Authorization: Basic is not a key."""
        self.assertRefused("127.0.0.1", {"authorization": f"Basic {KEY}"}, 401, "missing private key")

    def test_ipv4_mapped_ipv6_peer(self):
        """An IPv4-mapped IPv6 peer (::ffff:127.0.0.1) matches the IPv4 network."""
        gate().check("::ffff:127.0.0.1", {"x-pydio-key": KEY})
        self.assertFalse(gate().host_allowed("::ffff:192.0.2.1", {}))

    def test_cidr(self):
        """Any address inside an authorized CIDR is allowed, the next one outside is not."""
        self.assertTrue(gate().host_allowed("10.255.255.255", {}))
        self.assertTrue(gate().host_allowed("10.0.0.1", {}))
        self.assertFalse(gate().host_allowed("11.0.0.0", {}))

    def test_ipv6_peer(self):
        """An IPv6 peer matches IPv6 networks, with or without a zone id."""
        self.assertTrue(gate().host_allowed("::1", {}))
        self.assertFalse(gate().host_allowed("::2", {}))
        self.assertFalse(gate().host_allowed("fe80::1%eth0", {}))

    def test_non_ip_peer_is_refused(self):
        """A peer that is not an IP address (e.g. a UNIX socket name) is not authorized."""
        self.assertFalse(gate().host_allowed("localhost", {}))
        self.assertFalse(gate().host_allowed("", {}))

    def test_sources_are_read_at_each_check(self):
        """Networks and key are read at every check, so a changed configuration applies."""
        state = {"networks": NETWORKS, "key": KEY}
        live = PublisherGate(lambda: state["networks"], lambda: state["key"],
                             FailureLimiter(Clock(), 10, 60))
        live.check("10.1.1.1", {"x-pydio-key": KEY})
        state["key"] = "rotated"
        with self.assertRaises(AuthError):
            live.check("10.1.1.1", {"x-pydio-key": KEY})
        state["networks"] = ()
        self.assertFalse(live.host_allowed("10.1.1.1", {}))

    def test_publisher_key_header_detection(self):
        """Admin-Key or X-Pydio-Key mark a publisher handshake; Authorization does not."""
        self.assertTrue(carries_publisher_key({"admin-key": ""}))
        self.assertTrue(carries_publisher_key({"x-pydio-key": KEY}))
        self.assertFalse(carries_publisher_key({"authorization": f"Bearer {KEY}"}))


class RateLimitTests(unittest.TestCase):
    """Bad keys are rate-limited per publisher address."""

    def test_bad_keys_lead_to_429_until_the_window_passes(self):
        """After max_failures bad keys, even the right key gets 429 until the window ends."""
        clock = Clock()
        limited = gate(clock=clock)
        for _ in range(3):
            with self.assertRaises(AuthError):
                limited.check("127.0.0.1", {"x-pydio-key": "wrong"})
        with self.assertRaises(AuthError) as caught:
            limited.check("127.0.0.1", {"x-pydio-key": KEY})
        self.assertEqual(caught.exception.status, 429)
        clock.advance(60)
        limited.check("127.0.0.1", {"x-pydio-key": KEY})

    def test_other_addresses_are_not_limited(self):
        """One address's failures do not block another."""
        limited = gate()
        for _ in range(3):
            with self.assertRaises(AuthError):
                limited.check("127.0.0.1", {"x-pydio-key": "wrong"})
        limited.check("10.0.0.1", {"x-pydio-key": KEY})


class ForwardedForTests(unittest.TestCase):
    """X-Forwarded-For counts only when the peer is a trusted proxy."""

    def test_untrusted_peer_cannot_claim_an_authorized_address(self):
        """A peer outside authorized_hosts stays refused whatever X-Forwarded-For says."""
        with self.assertRaises(AuthError) as caught:
            gate().check("192.0.2.9", {"x-forwarded-for": "127.0.0.1", "x-pydio-key": KEY})
        self.assertEqual(caught.exception.status, 403)

    def test_trusted_proxy_forwards_the_client_address(self):
        """Behind a trusted proxy, the forwarded client address is the one checked."""
        proxies = (ipaddress.ip_network("127.0.0.1/32"),)
        forwarded = gate(proxies=proxies)
        with self.assertRaises(AuthError) as caught:
            forwarded.check("127.0.0.1", {"x-forwarded-for": "192.0.2.9", "x-pydio-key": KEY})
        self.assertEqual(caught.exception.status, 403)
        forwarded.check("127.0.0.1", {"x-forwarded-for": "192.0.2.9, 10.0.0.7", "x-pydio-key": KEY})
