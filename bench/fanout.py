"""Fan-out benchmark: how fast one pydio-ws process pushes published messages to many browsers.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/fanout.py --clients 1000 --messages 2000 --in-flight 16

What it does:

1. Starts the real server, `twistd -n pydio-ws`, as a subprocess on a free 127.0.0.1 port
   (one shared listener for browsers and publishers), pinned to CPU 0 with `taskset -c 0`.
   The private key is random and reaches the server through its environment only, as do
   connection caps raised to `--clients` + 100 (every client comes from 127.0.0.1). The
   server's output goes to a temporary file that is summarised at the end, then deleted.
2. Pins this process, the load generator, to the other CPUs.
3. Opens `--clients` Autobahn WebSocket clients, at most `--connect-concurrency` opening
   handshakes at a time, each with its own token; client i sends `register:<w>` with
   w = 1 + i % W (`--workspaces`). GET /private/status is polled until the server counts
   every registration, so no message is published before its recipients listen.
4. Publishes `--messages` messages with HTTP POST /private over persistent connections,
   at most `--in-flight` requests outstanding. Message s goes to workspace 1 + s % W; its
   CONTENT is "<s> <send time in ns> " padded with "x" to `--payload` bytes.
5. Once every POST is answered, waits up to `--straggler-wait` seconds for the
   deliveries still on their way, then prints one JSON line and stops the server by its
   PID (SIGTERM, then SIGKILL), whatever happened before. `--deadline` bounds the run.

How to read the JSON line:

- `deliveries_per_second`: frames received by all clients together, divided by the time
  from the first publish to the last delivery. One message to a workspace of 100 clients
  is 100 deliveries.
- `publishes_per_second`: messages accepted (200) per second of the publish phase.
- `latency_ms`: p50 / p99 / max of (client receive - publish send). Both instants are
  read from this process's monotonic clock, so no cross-process clock is involved. It
  includes the HTTP request, the server's fan-out, the kernel and any queueing in this
  process while it is busy.
- `lost_deliveries`: expected minus received, for the messages the server accepted. Anything
  but 0 is a failure, as are `publish_errors`, `unexpected_deliveries` and
  `clients_closed_early` (e.g. closed by the server as slow consumers); the exit status
  is then 1.
- `server` / `client`: CPU seconds used from just before the first publish until the last
  delivery arrived (or the straggler wait ended), that divided by the same wall time
  (`cpu_utilization_publish`, 1.0 = one core saturated), the part spent in the kernel
  (`system_share`), and received deliveries per CPU second (`deliveries_per_cpu_second`);
  plus memory (the server's RSS and peak RSS from /proc, this process's peak RSS).
- `machine`: CPU seconds the rest of the machine was busy meanwhile (other processes,
  interrupts; well above 0 means the figures were disturbed) and hypervisor steal.
- `code`: the commit the server ran, plus a digest of uncommitted changes under pydio_ws/
  and twisted/; compare only runs with the same value.
- `bottleneck` names the side whose core was saturated (>= 0.9). When it is the client,
  the rates are a lower bound of what the server can do: the Python load generator, which
  receives every delivery, ran out of CPU first. When it is neither, the closed loop ran
  the two sides partly in turn (the publisher shares its process with the receivers, so a
  new publish waits while a burst of deliveries is read). Either way
  `server.deliveries_per_cpu_second` estimates what one saturated server core delivers
  for this fan-out shape.

Only 127.0.0.1 is ever listened on or connected to.
"""

import argparse
import json
import re
import resource
import sys
import time
from array import array
from collections import Counter

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint

from _common import (CONNECTION_MARGIN, HOST, PUBLIC_PATH, PrivateSide, ServerProcess,
                     connection_caps, cpu_since, cpu_snapshot, percentile, raise_open_file_limit,
                     run_with_server, workspace_of)
from pydio_ws.auth import make_token

REQUEST_TIMEOUT = 60.0
CONNECT_TIMEOUT = 60.0
POLL_INTERVAL = 0.1
TOKEN_LIFETIME = 3600.0
SATURATED = 0.9
NOTABLE_LOG_LINES = 10
_NOTABLE = re.compile(r"#(warn|error|critical)\]|Traceback|Unhandled")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Fan-out benchmark of pydio-ws: N WebSocket clients, M published messages.")
    parser.add_argument("--clients", type=int, required=True, help="WebSocket clients to connect")
    parser.add_argument("--messages", type=int, required=True, help="messages to publish")
    parser.add_argument("--in-flight", type=int, default=16, help="publish requests outstanding at most")
    parser.add_argument("--payload", type=int, default=128, help="CONTENT size in bytes (at least)")
    parser.add_argument("--workspaces", type=int, default=1, help="workspaces the clients are spread over")
    parser.add_argument("--connect-concurrency", type=int, default=200,
                        help="opening handshakes in progress at most")
    parser.add_argument("--straggler-wait", type=float, default=30.0,
                        help="seconds to wait for deliveries after the last publish is answered")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds the whole run may take")
    parser.add_argument("--server-log", metavar="FILE",
                        help="keep the server's output in FILE (default: a temporary file, deleted)")
    args = parser.parse_args(argv)
    for name in ("clients", "messages", "in_flight", "workspaces", "connect_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.workspaces > args.clients:
        parser.error("--workspaces must not exceed --clients")
    if args.deadline <= 0 or args.straggler_wait < 0:
        parser.error("--deadline must be positive and --straggler-wait not negative")
    return args


def log_summary(path: str) -> dict:
    """Line counts of the server's output, its first and last warning/error lines."""
    lines = notable = 0
    first, last = [], None
    with open(path, encoding="utf-8", errors="replace") as stream:
        for line in stream:
            lines += 1
            if _NOTABLE.search(line):
                notable += 1
                last = line.rstrip()[:300]
                if len(first) < NOTABLE_LOG_LINES:
                    first.append(last)
    summary = {"lines": lines, "warnings_and_errors": notable, "first_notable": first}
    if notable > len(first):
        summary["last_notable"] = last
    return summary


class Recorder:
    """Counts every delivery per message and keeps its latency; the receive hot path."""

    def __init__(self, messages: int):
        self.counts = array("I", bytes(4 * messages))
        self.latencies = array("q")
        self.received = 0
        self.expected = None
        self.last_ns = 0
        self.closed_early = 0
        self.finishing = False
        self.complete = defer.Deferred()

    def record(self, payload: bytes, now: int) -> None:
        sequence, sent, _ = payload.split(b" ", 2)
        self.latencies.append(now - int(sent))
        self.counts[int(sequence)] += 1
        self.received += 1
        self.last_ns = now
        if self.received == self.expected:
            self.complete.callback(None)

    def expect(self, total: int) -> None:
        """Set (or lower, after refused publishes) the number of deliveries expected."""
        self.expected = total
        if self.received >= total and not self.complete.called:
            self.complete.callback(None)


class BenchClient(WebSocketClientProtocol):
    """A browser stand-in: registers on open, hands every frame to the recorder."""

    def onOpen(self):
        self.sendMessage(self.factory.register_frame)
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.recorder.record(payload, time.perf_counter_ns())

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        elif not self.factory.recorder.finishing:
            self.factory.recorder.closed_early += 1


class BenchClientFactory(WebSocketClientFactory):
    """One client's URL (its token) and workspace; `opened` fires once it is open."""

    protocol = BenchClient

    def __init__(self, url: str, workspace: str, recorder: Recorder):
        super().__init__(url)
        self.register_frame = f"register:{workspace}".encode("ascii")
        self.recorder = recorder
        self.opened = defer.Deferred()
        # Validating UTF-8 costs the load generator CPU and tells nothing about the server.
        self.setProtocolOptions(utf8validateIncoming=False, openHandshakeTimeout=CONNECT_TIMEOUT)


def cpu_figures(user: float, system: float, wall_seconds: float, deliveries: int) -> dict:
    """CPU use of one side over the publish phase, and the deliveries per CPU second it implies."""
    cpu_seconds = user + system
    return {
        "cpu_seconds_publish": round(cpu_seconds, 3),
        "system_share": round(system / cpu_seconds, 3) if cpu_seconds else None,
        "cpu_utilization_publish": round(cpu_seconds / wall_seconds, 3),
        "deliveries_per_cpu_second": round(deliveries / cpu_seconds) if cpu_seconds else None,
    }


class FanoutBench:
    """One benchmark run against a started ServerProcess, inside the reactor."""

    def __init__(self, args, server: ServerProcess, key: str, reactor):
        self._args = args
        self._server = server
        self._key = key
        self._reactor = reactor
        self._private = PrivateSide(reactor, server.port, key, args.in_flight, REQUEST_TIMEOUT)
        self.recorder = Recorder(args.messages)
        self._expected_per_workspace = {}
        self.phase = "starting"
        self.publish_errors = 0
        self.first_publish_error = None
        self.first_publish_ns = None
        self.last_answer_ns = None
        self.connect_seconds = None

    async def run(self) -> dict:
        """Start-up, connect, publish, wait; returns the result document."""
        await self._private.wait_until_ready(self._server, POLL_INTERVAL)
        self.phase = "connecting"
        started = time.perf_counter()
        clients = await self._connect_all()
        self.connect_seconds = time.perf_counter() - started
        self.phase = "registering"
        await self._wait_until_registered()
        cpu_before = cpu_snapshot(self._server)
        self.phase = "publishing"
        await self._publish_all()
        self.phase = "waiting for stragglers"
        await self._wait_for_stragglers()
        cpu = cpu_since(self._server, cpu_before)
        end_ns = self.recorder.last_ns or self.last_answer_ns
        phase_seconds = (end_ns - self.first_publish_ns) / 1e9
        status = await self._private.status()
        self.phase = "done"
        self.recorder.finishing = True
        await self._private.close()
        for client in clients:
            if client.transport is not None:
                client.transport.abortConnection()
        return self._result(phase_seconds, cpu, status)

    async def _sleep(self, seconds: float) -> None:
        await task.deferLater(self._reactor, seconds, lambda: None)

    async def _connect_all(self) -> list:
        args = self._args
        expires_at = time.time() + TOKEN_LIFETIME
        limiter = defer.DeferredSemaphore(args.connect_concurrency)
        failures = []
        clients = []

        async def connect(index: int) -> None:
            workspace = workspace_of(index, args.workspaces)
            token = make_token(self._key, f"bench-{index}", {workspace: "r"}, expires_at)
            url = f"ws://{HOST}:{self._server.port}{PUBLIC_PATH}?token={token}"
            factory = BenchClientFactory(url, workspace, self.recorder)
            endpoint = TCP4ClientEndpoint(self._reactor, HOST, self._server.port,
                                          timeout=CONNECT_TIMEOUT)
            try:
                await endpoint.connect(factory)
                clients.append(await factory.opened)
            except Exception as error:
                failures.append(error)

        await defer.gatherResults([
            limiter.run(lambda index=index: defer.Deferred.fromCoroutine(connect(index)))
            for index in range(args.clients)
        ])
        if failures:
            raise RuntimeError(f"{len(failures)} of {args.clients} clients failed to connect; "
                               f"first: {failures[0]!r}")
        self._expected_per_workspace = dict(
            Counter(workspace_of(index, args.workspaces) for index in range(args.clients)))
        return clients

    async def _wait_until_registered(self) -> None:
        while True:
            registered = (await self._private.status())["connections"]["registered"]
            if registered == self._expected_per_workspace:
                return
            await self._sleep(POLL_INTERVAL)

    def _expected_of(self, sequence: int) -> int:
        return self._expected_per_workspace[workspace_of(sequence, self._args.workspaces)]

    async def _publish_all(self) -> None:
        args = self._args
        self.recorder.expect(sum(self._expected_of(s) for s in range(args.messages)))
        sequences = iter(range(args.messages))
        await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._publisher(sequences)) for _ in range(args.in_flight)],
            consumeErrors=True)

    async def _publisher(self, sequences) -> None:
        """One of the `--in-flight` loops: POST the next message, await its answer, repeat."""
        workspaces, payload = self._args.workspaces, self._args.payload
        for sequence in sequences:
            sent = time.perf_counter_ns()
            content = f"{sequence} {sent} ".ljust(payload, "x")
            if self.first_publish_ns is None:
                self.first_publish_ns = sent
            code, answer = await self._private.publish(workspace_of(sequence, workspaces), content)
            self.last_answer_ns = time.perf_counter_ns()
            if code != 200 or json.loads(answer) != {"published": 1}:
                self.publish_errors += 1
                if self.first_publish_error is None:
                    self.first_publish_error = f"{code} {answer[:200]!r}"
                self.recorder.expect(self.recorder.expected - self._expected_of(sequence))

    async def _wait_for_stragglers(self) -> None:
        complete = self.recorder.complete
        if not complete.called:
            try:
                await complete.addTimeout(self._args.straggler_wait, self._reactor)
            except defer.TimeoutError:
                pass

    def _result(self, phase_seconds: float, cpu: tuple, status: dict) -> dict:
        """The result document; `cpu` is (wall, server user, server system, client user,
        client system, machine busy, machine steal) seconds of the publish phase."""
        args, recorder = self._args, self.recorder
        ordered = sorted(recorder.latencies)
        lost = sum(max(0, self._expected_of(s) - recorder.counts[s]) for s in range(args.messages))
        unexpected = sum(max(0, recorder.counts[s] - self._expected_of(s)) for s in range(args.messages))
        accepted = args.messages - self.publish_errors
        publish_seconds = (self.last_answer_ns - self.first_publish_ns) / 1e9
        wall, server_user, server_system, client_user, client_system, busy, steal = cpu
        others = busy - server_user - server_system - client_user - client_system
        server = cpu_figures(server_user, server_system, wall, recorder.received)
        client = cpu_figures(client_user, client_system, wall, recorder.received)
        saturated = [side for side, figures in (("server", server), ("client", client))
                     if figures["cpu_utilization_publish"] >= SATURATED]
        notes = []
        if "client" in saturated:
            notes.append("the load generator was CPU-bound: throughput and latency are a lower "
                         "bound of the server's capacity; see server.deliveries_per_cpu_second")
        if not saturated:
            notes.append("neither core was saturated: the closed loop alternates between server "
                         "work and client work; see server.deliveries_per_cpu_second")
        result = {
            "clients": args.clients, "workspaces": args.workspaces, "messages": args.messages,
            "in_flight": args.in_flight, "payload": args.payload,
            "connect_seconds": round(self.connect_seconds, 3),
            "publish_seconds": round(publish_seconds, 3),
            "duration_seconds": round(phase_seconds, 3),
            "publishes_per_second": round(accepted / publish_seconds, 1),
            "expected_deliveries": recorder.expected,
            "received_deliveries": recorder.received,
            "lost_deliveries": lost,
            "unexpected_deliveries": unexpected,
            "publish_errors": self.publish_errors,
            "clients_closed_early": recorder.closed_early,
            "deliveries_per_second": round(recorder.received / phase_seconds, 1),
            "latency_ms": {
                "p50": round(percentile(ordered, 0.50) / 1e6, 3) if ordered else None,
                "p99": round(percentile(ordered, 0.99) / 1e6, 3) if ordered else None,
                "max": round(ordered[-1] / 1e6, 3) if ordered else None,
            },
            "server": dict(server, **self._server.memory_mib(),
                           cpu_seconds_total=round(sum(self._server.cpu_times()), 3),
                           counted_delivered=status["messages"]["delivered"]),
            "client": dict(client, peak_rss_mib=round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)),
            "machine": {"other_busy_seconds_publish": round(max(0.0, others), 2),
                        "steal_seconds_publish": round(steal, 2)},
            "bottleneck": " and ".join(saturated) or "neither core saturated",
            "notes": notes,
        }
        if self.first_publish_error:
            result["first_publish_error"] = self.first_publish_error
        return result

    def partial(self, reason: str) -> dict:
        """What is known when the run failed or hit the deadline."""
        return {"error": reason, "phase": self.phase, "clients": self._args.clients,
                "messages": self._args.messages, "expected_deliveries": self.recorder.expected,
                "received_deliveries": self.recorder.received, "publish_errors": self.publish_errors,
                "clients_closed_early": self.recorder.closed_early}


def succeeded(result: dict) -> bool:
    return ("error" not in result and result["lost_deliveries"] == 0
            and result["unexpected_deliveries"] == 0 and result["publish_errors"] == 0
            and result["clients_closed_early"] == 0)


def main(argv=None) -> int:
    args = parse_args(argv)
    open_files = raise_open_file_limit()
    if open_files < args.clients + 100:
        sys.exit(f"open-file limit {open_files} is too low for {args.clients} clients")
    result = run_with_server(FanoutBench, args, connection_caps(args.clients + CONNECTION_MARGIN),
                             log_summary, open_files, "pydio-ws-bench-")
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if succeeded(result) else 1


if __name__ == "__main__":
    sys.exit(main())
