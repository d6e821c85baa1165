"""Several processes on one machine (`[server] workers = N`).

Every process listens on the same addresses with SO_REUSEPORT, so the kernel spreads
new connections over them, and the processes are joined by the Redis broker: a message
published to any process reaches the matching browsers of every process. Process 0 is
the one twistd started; it starts processes 1..N-1 (`python -m pydio_ws.worker`) once
its own listeners are bound (so port 0 resolves to one real port for all), and stops
them when it stops. A worker exits when process 0 goes away (its stdin closes).

The worker's instructions travel in the environment (`PYDIO_WS_WORKER_SPEC`): the
config file, the command-line overrides and the real ports; secrets never in argv. A
worker reports that it listens by writing a line on file descriptor 3.
"""

import json
import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from pydio_ws.listener import LISTEN_BACKLOG

SPEC_ENV = "PYDIO_WS_WORKER_SPEC"
READY_FD = 3
KILL_AFTER = 5.0


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """A TCP server endpoint whose socket has SO_REUSEPORT, shared by the workers."""

    def __init__(self, reactor, host: str, port: int):
        self._reactor = reactor
        self._host = host
        self._port = port

    def listen(self, factory):
        try:
            family, _, _, _, address = socket.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
            listening = socket.socket(family, socket.SOCK_STREAM)
            try:
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                listening.bind(address)
                listening.listen(LISTEN_BACKLOG)
                listening.setblocking(False)
                # adoptStreamPort duplicates the descriptor; ours is closed below.
                port = self._reactor.adoptStreamPort(listening.fileno(), family, factory)
            finally:
                listening.close()
        except OSError as failure:
            return defer.fail(error.CannotListenError(self._host, self._port, failure))
        return defer.succeed(port)


def worker_spec(config, index: int, ports: dict, log_output: tuple) -> str:
    """The JSON instructions for worker `index`: config source, overrides, real ports,
    and the log format and level of process 0."""
    return json.dumps({
        "index": index,
        "config": config.source,
        "overrides": [[section, name, raw] for (section, name), raw in config.overrides.items()],
        "ports": ports,
        "log": list(log_output),
    })


def spec_overrides(spec: dict) -> dict:
    """The overrides a worker loads its config with: the parent's, and its real ports."""
    overrides = {(section, name): raw for section, name, raw in spec["overrides"]}
    for side, port in spec["ports"].items():
        overrides[side, "port"] = str(port)
    return overrides


class _WorkerProcess(protocol.ProcessProtocol):
    """Watches one worker process: `ready` fires once it listens, `ended` when it exits."""

    def __init__(self, index: int):
        self.index = index
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()

    def childDataReceived(self, childFD, data):
        if childFD == READY_FD and not self.ready.called:
            self.ready.callback(self.index)

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError(f"worker {self.index} exited before it was ready"))
        self.ended.callback(reason.value)


class WorkerPool(service.Service):
    """In process 0: starts workers 1..N-1 after the listeners, stops them on stop."""

    _log = Logger()

    def __init__(self, reactor, config, ports, log_output: tuple):
        """`ports()` returns {"public": port, "private": port} once the listeners are bound;
        `log_output` is the (format, level) the workers log with."""
        self._reactor = reactor
        self._config = config
        self._ports = ports
        self._log_output = log_output
        self._workers = []

    def startService(self):
        super().startService()
        for index in range(1, self._config.server.workers):
            worker = _WorkerProcess(index)
            env = dict(os.environ, **{SPEC_ENV: worker_spec(
                self._config, index, self._ports(), self._log_output)})
            worker.transport = self._reactor.spawnProcess(
                worker, sys.executable, [sys.executable, "-m", "pydio_ws.worker"], env=env,
                childFDs={0: "w", 1: 1, 2: 2, READY_FD: "r"})
            worker.ready.addCallbacks(
                lambda index: self._log.info("worker {index} ready", index=index),
                lambda failure: self._log.error("{reason}", reason=str(failure.value)))
            self._workers.append(worker)
            self._log.info("started worker {index} (pid {pid})", index=index, pid=worker.transport.pid)

    def ready(self):
        """Fires when every worker listens (or fails if one exits first)."""
        return defer.gatherResults([worker.ready for worker in self._workers], consumeErrors=True)

    def signal_all(self, signum: int) -> None:
        """Pass a signal on to every worker (SIGHUP: they reload too)."""
        for worker in self._workers:
            self._signal(worker, signum)

    def stopService(self):
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop_workers())

    async def _stop_workers(self):
        for worker in self._workers:
            self._signal(worker, signal.SIGTERM)
        kill = self._reactor.callLater(self._config.limits.shutdown_timeout + KILL_AFTER,
                                       self._kill_remaining)
        await defer.DeferredList([worker.ended for worker in self._workers])
        if kill.active():
            kill.cancel()
        self._workers = []

    def _kill_remaining(self):
        for worker in self._workers:
            if not worker.ended.called:
                self._log.warn("worker {index} did not stop in time: killed", index=worker.index)
                self._signal(worker, signal.SIGKILL)

    @staticmethod
    def _signal(worker, signum):
        try:
            worker.transport.signalProcess(signum)
        except error.ProcessExitedAlready:
            pass
