"""What our Autobahn protocols and factories share: timers on the injected reactor, and
a leaner connection set-up.

Autobahn schedules its handshake, close and ping timers through `factory._batched_timer`,
a txaio batched timer bound to the global reactor whose cancelled calls stay scheduled
until their bucket fires. Timers straight on the factory's own reactor are exact, cancel
cleanly and follow a test's `Clock`. Autobahn also leaves its close-handshake and
connection-drop timers running after the connection is gone; we cancel them, and we
break the reference cycles a closed connection would otherwise leave for the cycle
collector (whose full passes pause the server when thousands of browsers churn).

Each connection copies the factory's options when it opens, as Autobahn does, but from a
dict the factory prepares once: Autobahn's own copy also pretty-prints all of them for a
debug line that is then thrown away (a fifth of a handshake's CPU). Once open, a
connection lets go of its opening handshake (request bytes, headers, the query and its
token, the response), which Autobahn would keep for the connection's lifetime.
"""

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

_TIMERS_LEFT_BY_AUTOBAHN = ("closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall")
_OPTION_NAMES = WebSocketServerProtocol.CONFIG_ATTRS
_HANDSHAKE_LEFTOVERS = ("http_request_data", "http_status_line", "http_headers", "http_request_uri",
                        "http_request_path", "http_request_params", "http_request_host",
                        "http_response_data", "_wskey")


class ReactorTimer:
    """txaio's `IBatchedTimer.call_later`, served by one reactor's `callLater`."""

    def __init__(self, reactor):
        self._reactor = reactor

    def call_later(self, delay, function, *args, **kwargs):
        return self._reactor.callLater(delay, function, *args, **kwargs)


class ServerFactoryBase(WebSocketServerFactory):
    """A WebSocketServerFactory whose protocol timers run on the injected reactor."""

    def __init__(self, reactor):
        super().__init__(reactor=reactor)
        self._batched_timer = ReactorTimer(reactor)

    def resetProtocolOptions(self):
        super().resetProtocolOptions()
        self._snapshot_options()

    def setProtocolOptions(self, **options):
        super().setProtocolOptions(**options)
        self._snapshot_options()

    def _snapshot_options(self) -> None:
        """What each new connection copies: the options as they are now."""
        self.connection_options = {name: getattr(self, name) for name in _OPTION_NAMES}


class ServerProtocolBase(WebSocketServerProtocol):
    """A WebSocketServerProtocol that leaves no timer behind when its connection ends,
    and sends small frames at once (TCP_NODELAY).

    Autobahn's own log keeps only errors: our protocols log every connection event
    once, with the client and the user; Autobahn would add a second, warn-level line
    for each refusal and each dropped peer.
    """

    log = txaio.make_logger(level="error")
    CONFIG_ATTRS = ()  # copied in _connectionMade below, without Autobahn's debug dump

    def _connectionMade(self):
        self.__dict__.update(self.factory.connection_options)
        super()._connectionMade()
        # Autobahn sets TCP_NODELAY before it copies the option from the factory, so
        # it never takes effect; without it, a lone push waits for the delayed ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

    def _onOpen(self):
        for name in _HANDSHAKE_LEFTOVERS:
            setattr(self, name, None)
        super()._onOpen()

    def _connectionLost(self, reason):
        for name in _TIMERS_LEFT_BY_AUTOBAHN:
            call = getattr(self, name, None)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        super()._connectionLost(reason)
        # is_closed fires with the protocol itself: a reference cycle that would keep
        # every closed connection for the cycle collector. Whoever waits on it holds it.
        self.is_closed = None
