"""Entry point of worker processes 1..N-1 (`python -m pydio_ws.worker`), started by
process 0 with its instructions in the environment (see `pydio_ws.workers`)."""

import json
import os

from twisted.internet import defer, stdio, task
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, globalLogBeginner

from pydio_ws.config import load_config
from pydio_ws.logs import stdout_observer
from pydio_ws.service import PydioWSService
from pydio_ws.workers import READY_FD, SPEC_ENV, spec_overrides


class _ParentWatch(Protocol):
    """Stdin is a pipe from process 0: when it closes, process 0 is gone."""

    def __init__(self, gone: defer.Deferred):
        self._gone = gone

    def connectionLost(self, reason):
        if not self._gone.called:
            self._gone.callback(None)


async def run(reactor, spec: dict):
    """Serve as worker `spec["index"]` until process 0 goes away or a signal stops us."""
    log = Logger(namespace=f"pydio_ws.worker.{spec['index']}")
    config = load_config(spec["config"], overrides=spec_overrides(spec))
    pydio = PydioWSService(config, reactor, owns_process=True, worker_index=spec["index"])
    pydio.startService()
    reactor.addSystemEventTrigger("before", "shutdown", pydio.stopService)
    os.write(READY_FD, b"ready\n")
    os.close(READY_FD)
    log.info("worker {index} serving", index=spec["index"])
    parent_gone = defer.Deferred()
    stdio.StandardIO(_ParentWatch(parent_gone), reactor=reactor)
    # Returning ends react(), whose shutdown runs the trigger above.
    await parent_gone


def main() -> None:
    spec = json.loads(os.environ.pop(SPEC_ENV))
    globalLogBeginner.beginLoggingTo([stdout_observer(*spec["log"])])
    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, spec)))


if __name__ == "__main__":
    main()
