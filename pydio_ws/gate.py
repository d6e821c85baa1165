"""Who may publish: the authorized-host check, then the constant-time key check."""

import hmac
import ipaddress
from typing import Callable, Iterable, Mapping, Optional

from pydio_ws.auth import AuthError

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


def _address(host: str):
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


class PublisherGate:
    """Checks a publisher: peer in the authorized networks (403), then the key (401)."""

    def __init__(self, networks_source: Callable[[], Iterable], key_source: Callable[[], str]):
        self._networks_source = networks_source
        self._key_source = key_source

    def host_allowed(self, peer_host: str) -> bool:
        address = _address(peer_host)
        return address is not None and any(
            address.version == network.version and address in network
            for network in self._networks_source()
        )

    def check(self, peer_host: str, headers: Mapping[str, str]) -> None:
        """Raise AuthError(403) for an unauthorized host, AuthError(401) for a bad key."""
        if not self.host_allowed(peer_host):
            raise AuthError(403, f"host {peer_host} is not authorized to publish")
        key = presented_key(headers)
        if key is None:
            raise AuthError(401, "missing private key")
        if not hmac.compare_digest(key.encode("utf-8"), self._key_source().encode("utf-8")):
            raise AuthError(401, "wrong private key")
