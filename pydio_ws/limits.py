"""Defences against one peer hurting the others: connection caps, failure rate limits,
and the client address behind a trusted proxy. Plain objects; time from an injected clock.
"""

import ipaddress
from collections import OrderedDict
from typing import Iterable, Optional

MAX_TRACKED_ADDRESSES = 100_000


def _address(text: str):
    try:
        address = ipaddress.ip_address(text.strip().split("%")[0])
    except ValueError:
        return None
    return getattr(address, "ipv4_mapped", None) or address


def in_networks(host: str, networks: Iterable) -> bool:
    """True when `host` (an IP string) is inside one of `networks`."""
    address = _address(host)
    return address is not None and any(
        address.version == network.version and address in network for network in networks)


def client_address(peer_host: str, forwarded_for: Optional[str], trusted_proxies: Iterable) -> str:
    """The client's IP: the peer, or, when the peer is a trusted proxy, the nearest
    untrusted address of `X-Forwarded-For` (read right to left)."""
    trusted = tuple(trusted_proxies)
    if not forwarded_for or not in_networks(peer_host, trusted):
        return peer_host
    for hop in reversed(forwarded_for.split(",")):
        hop = hop.strip()
        if _address(hop) is None:
            break
        if not in_networks(hop, trusted):
            return hop
    return peer_host


class FailureLimiter:
    """Blocks an address after `max_failures` failures within `window` seconds."""

    def __init__(self, clock, max_failures: int, window: float):
        self._clock = clock
        self.configure(max_failures, window)
        self._failures: "OrderedDict[str, tuple]" = OrderedDict()

    def configure(self, max_failures: int, window: float) -> None:
        self.max_failures = max_failures
        self.window = window

    def _current(self, address: str) -> tuple:
        started, count = self._failures.get(address, (0.0, 0))
        if self._clock.seconds() - started >= self.window:
            return self._clock.seconds(), 0
        return started, count

    def blocked(self, address: str) -> bool:
        """True while `address` has used up its failures for the current window."""
        return self._current(address)[1] >= self.max_failures

    def record_failure(self, address: str) -> None:
        started, count = self._current(address)
        self._failures[address] = (started, count + 1)
        self._failures.move_to_end(address)
        if len(self._failures) > MAX_TRACKED_ADDRESSES:
            self._failures.popitem(last=False)


class ConnectionCounter:
    """Open connections in total and per address, against configurable caps."""

    def __init__(self, max_total: int, max_per_address: int):
        self.configure(max_total, max_per_address)
        self.total = 0
        self._per_address = {}

    def configure(self, max_total: int, max_per_address: int) -> None:
        self.max_total = max_total
        self.max_per_address = max_per_address

    def acquire(self, address: str) -> Optional[str]:
        """Count a connection; returns the reason it is refused, or None when counted."""
        if self.total >= self.max_total:
            return f"server full ({self.max_total} connections)"
        if self._per_address.get(address, 0) >= self.max_per_address:
            return f"too many connections from {address} ({self.max_per_address})"
        self.total += 1
        self._per_address[address] = self._per_address.get(address, 0) + 1
        return None

    def release(self, address: str) -> None:
        self.total -= 1
        remaining = self._per_address[address] - 1
        if remaining:
            self._per_address[address] = remaining
        else:
            del self._per_address[address]
