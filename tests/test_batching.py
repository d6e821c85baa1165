"""Tests for pydio_ws.batching: one flush per reactor turn, safe direct sends."""

from types import SimpleNamespace

from twisted.internet import defer, endpoints, reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial import unittest

from pydio_ws.batching import TurnBatcher, send_now
from tests.support import wait_until


class _Connection:
    """A connection as the batcher sees it: something with flush_batch()."""

    def __init__(self, name, flushed):
        self._name = name
        self._flushed = flushed

    def flush_batch(self):
        self._flushed.append(self._name)


class TurnBatcherTests(unittest.TestCase):
    """Connections marked during a turn are flushed once, at the next turn."""

    def test_marks_of_one_turn_flush_once_each(self):
        """Several marks of one connection in a turn give one flush, scheduled once."""
        clock, flushed = Clock(), []
        batcher = TurnBatcher(clock)
        a, b = _Connection("a", flushed), _Connection("b", flushed)
        for connection in (a, b, a):
            batcher.mark(connection)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        self.assertEqual(flushed, [])
        clock.advance(0)
        self.assertEqual(sorted(flushed), ["a", "b"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_forgotten_connection_is_not_flushed(self):
        """A connection forgotten before the turn ends (it closed) is skipped."""
        clock, flushed = Clock(), []
        batcher = TurnBatcher(clock)
        a = _Connection("a", flushed)
        batcher.mark(a)
        batcher.forget(a)
        clock.advance(0)
        self.assertEqual(flushed, [])

    def test_explicit_flush_cancels_the_scheduled_one(self):
        """flush() sends now and leaves no call behind."""
        clock, flushed = Clock(), []
        batcher = TurnBatcher(clock)
        batcher.mark(_Connection("a", flushed))
        batcher.flush()
        self.assertEqual((flushed, clock.getDelayedCalls()), (["a"], []))


class SendNowTests(unittest.TestCase):
    """Only a plain TCP transport is written to directly."""

    def test_non_tcp_transport_gets_a_plain_write(self):
        """A transport that is not TCP (here an in-memory one) gets transport.write."""
        transport = StringTransport()
        send_now(transport, b"frame")
        self.assertEqual(transport.value(), b"frame")

    def test_wrapped_transport_is_never_bypassed(self):
        """A wrapping transport (as TLS is) that forwards `socket` is still written through."""
        inner = StringTransport()
        # Everything a direct send looks at, so that only the type check can stop it.
        inner.socket = SimpleNamespace(send=lambda data: self.fail("bypassed the wrapper"))
        inner.connected, inner.disconnecting, inner.dataBuffer, inner._tempDataBuffer = 1, False, b"", []
        wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapper.makeConnection(inner)
        send_now(wrapper, b"frame")
        self.assertEqual(inner.value(), b"frame")


class _Collector(Protocol):
    """One side of a loopback connection: keeps what it receives, tells when it is gone."""

    def __init__(self):
        self.data = bytearray()
        self.connected_once = defer.Deferred()
        self.lost = defer.Deferred()

    def connectionMade(self):
        self.connected_once.callback(self)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost.callback(None)


class DirectSendOnRealSocketsTests(unittest.TestCase):
    """send_now on a real loopback TCP connection."""

    async def connected_pair(self):
        """(server side, client side) of a fresh loopback connection, closed at cleanup."""
        accepted = defer.Deferred()
        factory = Factory()
        factory.buildProtocol = lambda address: self._track(_Collector(), accepted)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = await endpoints.connectProtocol(
            endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), _Collector())
        server = await accepted
        self.addCleanup(self._close, server, client)
        return server, client

    def _track(self, protocol, accepted):
        protocol.connected_once.addCallback(accepted.callback)
        return protocol

    async def _close(self, *sides):
        for side in sides:
            if side.transport.connected:
                side.transport.abortConnection()
        for side in sides:
            await side.lost

    async def test_what_the_socket_does_not_take_follows_in_order(self):
        """A write larger than the socket buffers is sent in part and queued for the rest;
        a later write waits behind it: the peer reads every byte, in order."""
        server, client = await self.connected_pair()
        large = bytes(range(256)) * (16 * 1024)  # 4 MiB: more than loopback buffers hold
        send_now(server.transport, large)
        self.assertTrue(server.transport.dataBuffer or server.transport._tempDataBuffer)
        send_now(server.transport, b"tail")
        await wait_until(lambda: len(client.data) >= len(large) + 4, polls=2000)
        self.assertEqual(bytes(client.data), large + b"tail")

    async def test_failed_socket_is_reported_as_a_lost_connection(self):
        """A send to a peer that has reset the connection raises nothing; the transport
        reports the connection lost."""
        server, client = await self.connected_pair()
        client.transport.abortConnection()
        await client.lost
        for _ in range(3):  # the first sends may still be accepted before the reset is seen
            if server.lost.called:
                break
            send_now(server.transport, b"x" * 65536)
            await task.deferLater(reactor, 0.05, lambda: None)
        await server.lost
