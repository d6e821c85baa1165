"""Counters the service keeps and reports on the status endpoint."""

from collections import Counter


class Stats:
    """Message and connection counters of one server process."""

    def __init__(self, started_at: float):
        self.started_at = started_at
        self.received = 0
        self.delivered = 0
        self.refused = 0
        self.ignored_commands = 0
        self.refused_handshakes = Counter()
        self.slow_consumers = 0
        self.ping_timeouts = 0
        self.closes = Counter()

    def as_dict(self, now: float) -> dict:
        return {
            "uptime": round(now - self.started_at, 3),
            "messages": {"received": self.received, "delivered": self.delivered,
                         "refused": self.refused},
            "commands_ignored": self.ignored_commands,
            "handshakes_refused": {str(status): count for status, count in
                                   sorted(self.refused_handshakes.items())},
            "slow_consumers": self.slow_consumers,
            "ping_timeouts": self.ping_timeouts,
            "closes": {str(code): count for code, count in sorted(self.closes.items(), key=str)},
        }
