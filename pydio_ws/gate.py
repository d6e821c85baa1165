"""Who may publish: the authorized-host check, the failure rate limit, then the
constant-time key check."""

import hmac
from typing import Callable, Iterable, Mapping, Optional

from pydio_ws.auth import AuthError
from pydio_ws.limits import FailureLimiter, client_address, in_networks

KEY_HEADERS = ("x-pydio-key", "admin-key")


def presented_key(headers: Mapping[str, str]) -> Optional[str]:
    """The key a publisher sent: `X-Pydio-Key`, legacy `Admin-Key`, or `Authorization: Bearer`.

    `headers` maps lower-cased header names to values.
    """
    for name in KEY_HEADERS:
        if name in headers:
            return headers[name].strip()
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return credentials.strip()
    return None


def carries_publisher_key(headers: Mapping[str, str]) -> bool:
    """True when a handshake names itself a publisher (Admin-Key or X-Pydio-Key)."""
    return any(name in headers for name in KEY_HEADERS)


class PublisherGate:
    """Checks a publisher: host in the authorized networks (403), not rate-limited for
    bad keys (429), then the key (401, counted against the host)."""

    def __init__(self, networks_source: Callable[[], Iterable], key_source: Callable[[], str],
                 limiter: FailureLimiter, proxies_source: Callable[[], Iterable] = tuple):
        self._networks_source = networks_source
        self._key_source = key_source
        self._limiter = limiter
        self._proxies_source = proxies_source

    def client(self, peer_host: str, headers: Mapping[str, str]) -> str:
        """The publisher's address: the peer, or the client behind a trusted proxy."""
        return client_address(peer_host, headers.get("x-forwarded-for"), self._proxies_source())

    def host_allowed(self, peer_host: str, headers: Mapping[str, str]) -> bool:
        return in_networks(self.client(peer_host, headers), self._networks_source())

    def check(self, peer_host: str, headers: Mapping[str, str]) -> None:
        """Raise AuthError 403 (host), 429 (too many bad keys) or 401 (bad key)."""
        client = self.client(peer_host, headers)
        if not in_networks(client, self._networks_source()):
            raise AuthError(403, f"host {client} is not authorized to publish")
        if self._limiter.blocked(client):
            raise AuthError(429, f"too many bad keys from {client}")
        key = presented_key(headers)
        if key is None or not hmac.compare_digest(
                key.encode("utf-8"), self._key_source().encode("utf-8")):
            self._limiter.record_failure(client)
            raise AuthError(401, "missing private key" if key is None else "wrong private key")
