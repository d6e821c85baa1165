"""Tests for pydio_ws.listener: parsing the raw request head and choosing its handler."""

from hypothesis import example, given
from hypothesis import strategies as st
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from pydio_ws.listener import BadHead, Head, Routes, parse_head


def head(request_line: str, *header_lines: str) -> Head:
    return parse_head("\r\n".join((request_line,) + header_lines).encode("latin-1"))


class ParseHeadTests(unittest.TestCase):
    """parse_head on request lines and headers."""

    def assertBadHead(self, raw: bytes, reason: str):
        with self.assertRaises(BadHead) as caught:
            parse_head(raw)
        self.assertEqual((caught.exception.status, caught.exception.reason), (400, reason))

    def test_origin_form(self):
        """An origin-form target gives its path, without the query; headers are lower-cased."""
        parsed = head("GET /public?token=abc HTTP/1.1", "Host: 127.0.0.1", "X-Pydio-Key:  k ")
        self.assertEqual((parsed.method, parsed.path), ("GET", "/public"))
        self.assertEqual(parsed.headers, {"host": "127.0.0.1", "x-pydio-key": "k"})
        self.assertFalse(parsed.upgrade)

    def test_absolute_form_is_reduced_to_path(self):
        """The legacy publisher's `GET ws://host:port/private` routes by /private."""
        self.assertEqual(head("GET ws://localhost:8090/private HTTP/1.1").path, "/private")
        self.assertEqual(head("GET http://localhost:8090 HTTP/1.1").path, "/")

    def test_upgrade_token_detection(self):
        """Upgrade: websocket is detected in any case and inside a token list."""
        for value in ("websocket", "WebSocket", "h2c, websocket", " websocket "):
            self.assertTrue(head("GET / HTTP/1.1", f"Upgrade: {value}").upgrade, value)
        for value in ("websockets", "h2c", ""):
            self.assertFalse(head("GET / HTTP/1.1", f"Upgrade: {value}").upgrade, value)

    def test_bad_request_lines(self):
        """A request line without three parts, HTTP/1.x, or an alphabetic method is 400."""
        for line in (b"GET /", b"GET / HTTP/2", b"G3T / HTTP/1.1", b"GET  / HTTP/1.1", b"",
                     b"GET / HTTP/1.1 extra"):
            self.assertBadHead(line, "bad request line")

    def test_bad_header_lines(self):
        """A header line without colon or with space before the colon is 400."""
        for line in ("no colon", "Host : x", ": empty name", " folded: x"):
            self.assertBadHead(f"GET / HTTP/1.1\r\n{line}".encode(), "bad header line")

    def test_malformed_absolute_target_is_bad_head(self):
        """An absolute-form target with an unclosed IPv6 bracket is 400, not a crash."""
        with self.assertRaises(BadHead) as caught:
            parse_head(b"GET http://[::1/private HTTP/1.1")
        self.assertEqual(caught.exception.status, 400)

    @given(st.binary())
    def test_arbitrary_bytes_raise_only_bad_head(self, raw):
        """Arbitrary bytes give a Head or BadHead, nothing else."""
        try:
            parsed = parse_head(raw)
        except BadHead as error:
            self.assertEqual(error.status, 400)
            return
        self.assertTrue(parsed.path.startswith("/") or parsed.path)

    @given(st.sampled_from(["GET", "POST"]),
           st.tuples(st.sampled_from(["", "/", "//", "ws://", "http://"]),
                     st.text(st.sampled_from("[]/:@?#%.a1")
                             | st.characters(min_codepoint=33, max_codepoint=255), max_size=30))
           .map("".join),
           st.lists(st.tuples(st.sampled_from(["Host", "Upgrade", "Admin-Key"]),
                              st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=20))
                    .map(": ".join), max_size=3))
    @example("GET", "ws://[::1:8090/private", [])
    def test_request_like_heads_raise_only_bad_head(self, method, target, header_lines):
        """Heads with a well-formed method and version and any target raise nothing but BadHead."""
        raw = "\r\n".join([f"{method} {target} HTTP/1.1"] + header_lines).encode("latin-1")
        try:
            parse_head(raw)
        except BadHead as error:
            self.assertEqual(error.status, 400)


def upgrade(path: str, **headers) -> Head:
    return Head("GET", path, {name.replace("_", "-"): value for name, value in headers.items()}, True)


class RoutesTests(unittest.TestCase):
    """Routes.websocket_factory picks the browser or publisher factory."""

    def setUp(self):
        self.site, self.browsers, self.publishers = Factory(), Factory(), Factory()

    def routes(self, browser_path="/public", publisher_path="/private") -> Routes:
        return Routes(self.site, browser_path, self.browsers, publisher_path, self.publishers)

    def test_separate_paths(self):
        """On separate paths each path has its factory, key header or not."""
        routes = self.routes()
        self.assertIs(routes.websocket_factory(upgrade("/public")), self.browsers)
        self.assertIs(routes.websocket_factory(upgrade("/public", admin_key="k")), self.browsers)
        self.assertIs(routes.websocket_factory(upgrade("/private")), self.publishers)

    def test_unknown_path_has_no_factory(self):
        """A WebSocket upgrade on another path has no factory."""
        self.assertIsNone(self.routes().websocket_factory(upgrade("/elsewhere")))

    def test_single_path_key_header_means_publisher(self):
        """On one shared path, Admin-Key or X-Pydio-Key makes the handshake a publisher."""
        routes = self.routes("/ws", "/ws")
        self.assertIs(routes.websocket_factory(upgrade("/ws", admin_key="k")), self.publishers)
        self.assertIs(routes.websocket_factory(upgrade("/ws", x_pydio_key="k")), self.publishers)

    def test_single_path_without_key_header_means_browser(self):
        """On one shared path, a handshake without a key header is a browser, Bearer or not."""
        routes = self.routes("/ws", "/ws")
        self.assertIs(routes.websocket_factory(upgrade("/ws")), self.browsers)
        self.assertIs(routes.websocket_factory(upgrade("/ws", authorization="Bearer t")), self.browsers)

    def test_listener_with_one_side_only(self):
        """A listener without a browser factory routes only its publisher path."""
        routes = Routes(self.site, publisher_path="/private", publishers=self.publishers)
        self.assertIs(routes.websocket_factory(upgrade("/private")), self.publishers)
        self.assertIsNone(routes.websocket_factory(upgrade("/public")))
