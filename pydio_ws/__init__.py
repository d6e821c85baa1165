"""pydio-ws: a real-time WebSocket push server for Pydio."""

__version__ = "0.1.0"
