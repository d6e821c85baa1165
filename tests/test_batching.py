"""Tests for pydio_ws.batching: one flush per reactor turn, safe direct sends."""

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial import unittest

from pydio_ws.batching import TurnBatcher, send_now


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
        """A wrapping transport (as TLS is) that forwards writeSomeData is still written through."""
        inner = StringTransport()
        inner.writeSomeData = lambda data: self.fail("bypassed the wrapper")
        wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapper.makeConnection(inner)
        send_now(wrapper, b"frame")
        self.assertEqual(inner.value(), b"frame")
