"""Tests for pydio_ws.origins: which browser origins may open a socket."""

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from pydio_ws.origins import OriginPolicy, normalize_origin


class NormalizeOriginTests(unittest.TestCase):
    """normalize_origin gives scheme://host[:port]."""

    def test_default_ports_are_dropped(self):
        """:443 for https and :80 for http are dropped; other ports are kept."""
        self.assertEqual(normalize_origin("https://pydio.example:443"), "https://pydio.example")
        self.assertEqual(normalize_origin("http://pydio.example:80"), "http://pydio.example")
        self.assertEqual(normalize_origin("https://pydio.example:80"), "https://pydio.example:80")

    def test_case_is_normalized(self):
        """Scheme and host are lower-cased."""
        self.assertEqual(normalize_origin("HTTPS://Pydio.Example"), "https://pydio.example")

    def test_ipv6_host_keeps_brackets(self):
        """An IPv6 host is written in brackets."""
        self.assertEqual(normalize_origin("http://[::1]:8080"), "http://[::1]:8080")

    def test_non_http_origins_are_value_errors(self):
        """Other schemes, "null" and text without host raise ValueError."""
        for text in ("ftp://pydio.example", "null", "pydio.example", "https://"):
            with self.assertRaises(ValueError):
                normalize_origin(text)


class OriginPolicyTests(unittest.TestCase):
    """OriginPolicy.allows."""

    def test_default_ports_match(self):
        """An allowed origin written with its default port matches the browser's origin without it."""
        policy = OriginPolicy(["https://pydio.example:443", "http://other.example"])
        self.assertTrue(policy.allows("https://pydio.example"))
        self.assertTrue(policy.allows("http://other.example:80"))

    def test_case_insensitive(self):
        """Scheme and host compare without case."""
        self.assertTrue(OriginPolicy(["https://Pydio.Example"]).allows("HTTPS://PYDIO.example"))

    def test_other_origins_are_refused(self):
        """Another host, scheme or port, "null" and garbage are refused."""
        policy = OriginPolicy(["https://pydio.example"])
        for origin in ("https://evil.example", "http://pydio.example", "https://pydio.example:8443",
                       "null", "https://pydio.example.evil.example", "https://[::1"):
            self.assertFalse(policy.allows(origin), origin)

    def test_empty_list_allows_all(self):
        """With no allowed origins every origin is allowed."""
        policy = OriginPolicy([])
        self.assertTrue(policy.allows("https://anything.example"))
        self.assertTrue(policy.allows("null"))

    def test_missing_origin_is_allowed(self):
        """A request without Origin (not a browser) is allowed even with a list."""
        policy = OriginPolicy(["https://pydio.example"])
        self.assertTrue(policy.allows(None))
        self.assertTrue(policy.allows(""))

    @given(st.text())
    def test_allows_never_raises(self, origin):
        """allows() answers True or False for any header text."""
        self.assertIn(OriginPolicy(["https://pydio.example"]).allows(origin), (True, False))
