"""TLS and plain text on one port, told apart by the first byte.

Pydio 6's PHP side publishes with plain `ws://` to the very host, port and path its
browsers use, even when the browsers use `wss://`. On a shared TLS listener whose
`private.ssl` is false, a connection whose first byte is not a TLS handshake record
(0x16) is served in plain text, but only for publishers: its router knows no browser
route, and publishers are still checked (authorized host, then key).
"""

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

TLS_HANDSHAKE_RECORD = 0x16


class _FirstByteSniffer(Protocol):
    """Waits for the first bytes, then hands the connection to the TLS or plain protocol."""

    _log = Logger()

    def __init__(self, factory, addr):
        self._factory = factory
        self._addr = addr
        self._chosen = None
        self._timer = None

    def connectionMade(self):
        self._timer = self._factory.reactor.callLater(self._factory.timeout, self._timed_out)

    def dataReceived(self, data):
        if self._chosen is None:
            self._cancel_timer()
            chosen = self._factory.tls if data[0] == TLS_HANDSHAKE_RECORD else self._factory.plain
            self._chosen = chosen.buildProtocol(self._addr)
            self._chosen.makeConnection(self.transport)
        self._chosen.dataReceived(data)

    def _timed_out(self):
        self._timer = None
        self._log.info("dropped {peer}: sent nothing within {seconds} s",
                       peer=self.transport.getPeer().host, seconds=self._factory.timeout)
        self.transport.abortConnection()

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason):
        self._cancel_timer()
        if self._chosen is not None:
            self._chosen.connectionLost(reason)


class TLSOrPlainFactory(Factory):
    """Serves TLS connections with `tls`, and the others with `plain`."""

    def __init__(self, reactor, tls: Factory, plain: Factory, timeout: float):
        self.reactor = reactor
        self.tls = tls
        self.plain = plain
        self.timeout = timeout

    def buildProtocol(self, addr):
        return _FirstByteSniffer(self, addr)
