"""What our Autobahn protocols and factories share: timers on the injected reactor.

Autobahn schedules its handshake, close and ping timers through `factory._batched_timer`,
a txaio batched timer bound to the global reactor whose cancelled calls stay scheduled
until their bucket fires. Timers straight on the factory's own reactor are exact, cancel
cleanly and follow a test's `Clock`. Autobahn also leaves its close-handshake and
connection-drop timers running after the connection is gone; we cancel them, and we
break the reference cycles a closed connection would otherwise leave for the cycle
collector (whose full passes pause the server when thousands of browsers churn).
"""

import txaio
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

_TIMERS_LEFT_BY_AUTOBAHN = ("closeHandshakeTimeoutCall", "serverConnectionDropTimeoutCall")


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


class ServerProtocolBase(WebSocketServerProtocol):
    """A WebSocketServerProtocol that leaves no timer behind when its connection ends,
    and sends small frames at once (TCP_NODELAY).

    Autobahn's own log keeps only errors: our protocols log every connection event
    once, with the client and the user; Autobahn would add a second, warn-level line
    for each refusal and each dropped peer.
    """

    log = txaio.make_logger(level="error")

    def _connectionMade(self):
        super()._connectionMade()
        # Autobahn sets TCP_NODELAY before it copies the option from the factory, so
        # it never takes effect; without it, a lone push waits for the delayed ACK.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            set_no_delay(True)

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
