"""Writing fan-out frames: one send per connection per reactor turn.

A published message is framed once; each recipient connection appends those bytes to
its batch and is marked dirty. At the end of the reactor turn, every dirty connection
joins its batch and sends it. Two costs are avoided this way:

- many messages to one connection in a turn (one busy workspace) become one write;
- a connection whose transport has nothing queued gets its bytes with a direct send,
  instead of `transport.write`, which registers the socket for writing, waits for the
  next poll, sends, and unregisters it again (three system calls instead of one).

Only a plain TCP transport with an empty buffer is written directly; anything else
(TLS, or bytes still queued) goes through `transport.write`, which keeps the order.
"""

from typing import Dict

from twisted.internet import tcp


def _sendable_now(transport) -> bool:
    """True for an open plain TCP transport with no unsent bytes.

    The type check matters: a TLS transport forwards unknown attributes, such as
    `socket`, to the TCP transport below it, which would bypass encryption.
    Twisted's TCP transport keeps unsent bytes in dataBuffer and _tempDataBuffer;
    sending past them would reorder the stream.
    """
    return (isinstance(transport, tcp.Connection) and transport.connected
            and not transport.disconnecting and not transport.dataBuffer
            and not transport._tempDataBuffer)


def send_now(transport, data: bytes) -> None:
    """Write `data`, sending at once when the transport is a plain TCP one with nothing queued.

    One `send()` on the socket, as Twisted's own writer would make; what it does not take
    is queued on the transport, after which the reactor writes it in order.
    """
    if not _sendable_now(transport):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except OSError:
        # It would block, or the socket failed: the transport sends the bytes when it can,
        # or reports the connection lost.
        sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)


class TurnBatcher:
    """Collects the connections that got frames during this reactor turn and calls each
    one's `flush_batch()` once, from a call scheduled at the first frame of the turn."""

    def __init__(self, reactor):
        self._reactor = reactor
        self._dirty: Dict[object, None] = {}
        self._call = None

    def mark(self, connection) -> None:
        """Remember that `connection` has a batch to send."""
        self._dirty[connection] = None
        if self._call is None:
            self._call = self._reactor.callLater(0, self.flush)

    def forget(self, connection) -> None:
        self._dirty.pop(connection, None)

    def flush(self) -> None:
        """Send every pending batch now."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        dirty, self._dirty = self._dirty, {}
        for connection in dirty:
            connection.flush_batch()
