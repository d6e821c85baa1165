"""Browser origin checks (cross-site WebSocket hijacking protection)."""

from typing import Iterable, Optional
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(url: str) -> str:
    """`scheme://host[:port]`, lower-cased, default port dropped; ValueError if not an origin."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http(s) origin: {url!r}")
    port = parts.port
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


class OriginPolicy:
    """Which `Origin` headers may open a browser socket; empty = any."""

    def __init__(self, allowed: Iterable[str]):
        self._allowed = frozenset(normalize_origin(origin) for origin in allowed)

    def allows(self, origin: Optional[str]) -> bool:
        """True for an allowed origin, or any origin when the list is empty.

        A request without Origin comes from a non-browser client, which cannot be
        hijacked cross-site, so it is allowed.
        """
        if not self._allowed or not origin:
            return True
        try:
            return normalize_origin(origin) in self._allowed
        except ValueError:
            return False
