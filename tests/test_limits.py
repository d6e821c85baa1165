"""Tests for pydio_ws.limits: failure rate limits, connection caps and the client address."""

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial import unittest

from pydio_ws.limits import (MAX_TRACKED_ADDRESSES, ConnectionCounter, FailureLimiter,
                             client_address, in_networks)

PROXIES = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


class FailureLimiterTests(unittest.TestCase):
    """FailureLimiter: N failures within a window block an address until the window ends."""

    def setUp(self):
        self.clock = Clock()
        self.limiter = FailureLimiter(self.clock, max_failures=3, window=60)

    def record(self, address, times=1):
        for _ in range(times):
            self.limiter.record_failure(address)

    def test_blocked_after_max_failures(self):
        """An address is free below max_failures and blocked once it reaches them."""
        self.record("192.0.2.1", 2)
        self.assertFalse(self.limiter.blocked("192.0.2.1"))
        self.record("192.0.2.1")
        self.assertTrue(self.limiter.blocked("192.0.2.1"))

    def test_addresses_are_counted_apart(self):
        """One address's failures do not block another."""
        self.record("192.0.2.1", 3)
        self.assertFalse(self.limiter.blocked("192.0.2.2"))

    def test_window_end_resets_the_count(self):
        """Failures older than the window are forgotten: the address is free again."""
        self.record("192.0.2.1", 3)
        self.clock.advance(59.9)
        self.assertTrue(self.limiter.blocked("192.0.2.1"))
        self.clock.advance(0.1)
        self.assertFalse(self.limiter.blocked("192.0.2.1"))
        self.record("192.0.2.1", 2)
        self.assertFalse(self.limiter.blocked("192.0.2.1"))

    def test_window_starts_at_the_first_failure(self):
        """Failures spread over one window add up; a new window starts from zero."""
        self.record("192.0.2.1")
        self.clock.advance(30)
        self.record("192.0.2.1")
        self.clock.advance(29)
        self.record("192.0.2.1")
        self.assertTrue(self.limiter.blocked("192.0.2.1"))
        self.clock.advance(1)
        self.record("192.0.2.1")
        self.assertFalse(self.limiter.blocked("192.0.2.1"))

    def test_configure_applies_to_tracked_addresses(self):
        """A lower max_failures applies at once to failures already counted."""
        self.record("192.0.2.1", 2)
        self.limiter.configure(2, 60)
        self.assertTrue(self.limiter.blocked("192.0.2.1"))

    def test_tracked_addresses_are_bounded(self):
        """Past MAX_TRACKED_ADDRESSES the least recently failed address is forgotten."""
        limiter = FailureLimiter(self.clock, max_failures=1, window=60)
        limiter.record_failure("oldest")
        limiter.record_failure("refreshed")
        for number in range(MAX_TRACKED_ADDRESSES - 2):
            limiter.record_failure(str(number))
        limiter.record_failure("refreshed")
        self.assertTrue(limiter.blocked("oldest"))
        limiter.record_failure("newest")
        self.assertFalse(limiter.blocked("oldest"))
        self.assertTrue(limiter.blocked("refreshed"))
        self.assertTrue(limiter.blocked("0"))
        self.assertTrue(limiter.blocked("newest"))


class ConnectionCounterTests(unittest.TestCase):
    """ConnectionCounter: caps in total and per address, freed on release."""

    def test_per_address_cap(self):
        """The connection over max_per_address is refused with its reason; others pass."""
        counter = ConnectionCounter(max_total=10, max_per_address=2)
        self.assertIsNone(counter.acquire("192.0.2.1"))
        self.assertIsNone(counter.acquire("192.0.2.1"))
        self.assertEqual(counter.acquire("192.0.2.1"), "too many connections from 192.0.2.1 (2)")
        self.assertIsNone(counter.acquire("192.0.2.2"))
        self.assertEqual(counter.total, 3)

    def test_total_cap(self):
        """The connection over max_total is refused whatever its address."""
        counter = ConnectionCounter(max_total=2, max_per_address=5)
        self.assertIsNone(counter.acquire("192.0.2.1"))
        self.assertIsNone(counter.acquire("192.0.2.2"))
        self.assertEqual(counter.acquire("192.0.2.3"), "server full (2 connections)")
        self.assertEqual(counter.total, 2)

    def test_refusal_is_not_counted(self):
        """A refused connection takes no slot: after a release one more fits, not two."""
        counter = ConnectionCounter(max_total=10, max_per_address=1)
        counter.acquire("192.0.2.1")
        for _ in range(3):
            self.assertIsNotNone(counter.acquire("192.0.2.1"))
        counter.release("192.0.2.1")
        self.assertIsNone(counter.acquire("192.0.2.1"))
        self.assertIsNotNone(counter.acquire("192.0.2.1"))

    def test_release_frees_both_caps(self):
        """Releasing a connection frees its address slot and its total slot."""
        counter = ConnectionCounter(max_total=2, max_per_address=1)
        counter.acquire("192.0.2.1")
        counter.acquire("192.0.2.2")
        counter.release("192.0.2.1")
        self.assertEqual(counter.total, 1)
        self.assertIsNone(counter.acquire("192.0.2.3"))
        self.assertIsNotNone(counter.acquire("192.0.2.1"))

    def test_released_addresses_are_forgotten(self):
        """An address with no connection left is not kept (many passing clients stay cheap)."""
        counter = ConnectionCounter(max_total=10, max_per_address=3)
        for address in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
            counter.acquire(address)
        for address in ("192.0.2.1", "192.0.2.2", "192.0.2.1"):
            counter.release(address)
        self.assertEqual((counter.total, counter._per_address), (0, {}))

    def test_configure_changes_the_caps(self):
        """New caps apply to the next acquire; open connections stay counted."""
        counter = ConnectionCounter(max_total=10, max_per_address=3)
        counter.acquire("192.0.2.1")
        counter.acquire("192.0.2.1")
        counter.configure(10, 2)
        self.assertIsNotNone(counter.acquire("192.0.2.1"))
        counter.configure(10, 3)
        self.assertIsNone(counter.acquire("192.0.2.1"))


class ClientAddressTests(unittest.TestCase):
    """client_address: X-Forwarded-For counts only behind a trusted proxy."""

    def test_no_trusted_proxies_ignores_forwarded_for(self):
        """Without trusted proxies X-Forwarded-For is ignored."""
        self.assertEqual(client_address("127.0.0.1", "10.1.2.3", ()), "127.0.0.1")

    def test_untrusted_peer_ignores_forwarded_for(self):
        """A peer that is not a trusted proxy cannot choose its address with the header."""
        self.assertEqual(client_address("192.0.2.9", "10.1.2.3", PROXIES), "192.0.2.9")

    def test_trusted_proxy_gives_its_client(self):
        """Behind a trusted proxy the forwarded address is the client."""
        self.assertEqual(client_address("127.0.0.1", "198.51.100.7", PROXIES), "198.51.100.7")

    def test_chain_is_read_right_to_left(self):
        """Trusted hops are skipped from the right; a spoofed left part is not believed."""
        self.assertEqual(
            client_address("127.0.0.1", "203.0.113.66, 198.51.100.7, 10.0.0.5 , 10.9.9.9", PROXIES),
            "198.51.100.7")

    def test_missing_or_empty_header_gives_peer(self):
        """A trusted proxy without X-Forwarded-For is the client itself."""
        for header in (None, ""):
            self.assertEqual(client_address("127.0.0.1", header, PROXIES), "127.0.0.1")

    def test_garbage_hop_stops_the_walk(self):
        """A hop that is not an IP ends the walk: the peer is the client, not a hop beyond."""
        for header in ("garbage", "198.51.100.7, garbage", "198.51.100.7, 10.0.0.5, not-an-ip",
                       "198.51.100.7:4711", "198.51.100.7, "):
            self.assertEqual(client_address("127.0.0.1", header, PROXIES), "127.0.0.1", header)

    def test_ipv4_mapped_proxy_is_trusted(self):
        """A proxy seen as ::ffff:127.0.0.1 is matched against its IPv4 network."""
        self.assertEqual(client_address("::ffff:127.0.0.1", "198.51.100.7", PROXIES), "198.51.100.7")

    def test_ipv6_client_behind_proxy(self):
        """An IPv6 client address is returned as forwarded."""
        self.assertEqual(client_address("10.0.0.1", "2001:db8::1", PROXIES), "2001:db8::1")

    def test_in_networks_refuses_non_addresses(self):
        """in_networks is False for a host that is not an IP."""
        self.assertFalse(in_networks("localhost", PROXIES))
        self.assertFalse(in_networks("", PROXIES))
        self.assertTrue(in_networks(" 10.2.3.4 ", PROXIES))

    @given(peer=st.one_of(st.text(), st.sampled_from(["127.0.0.1", "10.0.0.1", "192.0.2.1"])),
           forwarded=st.one_of(st.none(), st.text(),
                               st.lists(st.one_of(st.ip_addresses().map(str), st.text(max_size=8)))
                               .map(", ".join)))
    def test_client_address_never_raises(self, peer, forwarded):
        """Any peer and header give the peer or one of the header's hops, never an error."""
        result = client_address(peer, forwarded, PROXIES)
        hops = [hop.strip() for hop in (forwarded or "").split(",")]
        self.assertIn(result, [peer] + hops)
        if not in_networks(peer, PROXIES):
            self.assertEqual(result, peer)
