"""TLS and plain text on one port, told apart by the first byte.

Pydio 6's PHP side publishes with plain `ws://` to the very host, port and path its
browsers use, even when the browsers use `wss://`. On a shared TLS listener whose
`private.ssl` is false, a connection whose first byte is not a TLS handshake record
(0x16) is served in plain text, but only for publishers: its router knows no browser
route, and publishers are still checked (authorized host, then key).
"""

from twisted.internet.protocol import Factory

from pydio_ws.listener import HandOver

TLS_HANDSHAKE_RECORD = 0x16


class _FirstByteSniffer(HandOver):
    """Hands the connection to the TLS or the plain protocol, by its first byte."""

    awaited = "first byte"

    def __init__(self, factory):
        super().__init__(factory.reactor, factory.timeout)
        self._factory = factory

    def dataReceived(self, data):
        if self._inner is not None:
            self._inner.dataReceived(data)
        elif data[0] == TLS_HANDSHAKE_RECORD:
            self._hand_over(self._factory.tls, data)
        else:
            self._hand_over(self._factory.plain, data)


class TLSOrPlainFactory(Factory):
    """Serves TLS connections with `tls`, and the others with `plain`."""

    def __init__(self, reactor, tls: Factory, plain: Factory, timeout: float):
        self.reactor = reactor
        self.tls = tls
        self.plain = plain
        self.timeout = timeout

    def buildProtocol(self, addr):
        return _FirstByteSniffer(self)
