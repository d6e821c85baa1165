"""twistd plugin: `twistd -n pydio-ws [options]` runs pydio_ws.service."""

from twisted.application.service import ServiceMaker

pydio_ws = ServiceMaker(
    "pydio-ws",
    "pydio_ws.service",
    "Real-time WebSocket push server for Pydio.",
    "pydio-ws",
)
