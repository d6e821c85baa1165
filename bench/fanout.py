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
import hashlib
import json
import math
import os
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from array import array
from collections import Counter
from pathlib import Path

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError, ReactorNotRunning
from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            globalLogBeginner, textFileLogObserver)
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from pydio_ws.auth import make_token

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
PUBLIC_PATH = "/public"
PRIVATE_PATH = "/private"
STARTUP_TIMEOUT = 30.0
REQUEST_TIMEOUT = 60.0
CONNECT_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.1
POLL_TIMEOUT = 1.0
TOKEN_LIFETIME = 3600.0
SATURATED = 0.9
CONNECTION_MARGIN = 100
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


def raise_open_file_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (the server subprocess inherits it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def code_version() -> str:
    """The commit the server runs, with a digest of uncommitted changes: "abc1234+dirty.9f2e01"."""
    def git(*arguments) -> bytes:
        return subprocess.run(["git", "-C", str(REPO_ROOT), *arguments], capture_output=True,
                              check=True, timeout=30).stdout
    try:
        commit = git("rev-parse", "--short", "HEAD").decode().strip()
        changes = git("diff", "HEAD", "--", "pydio_ws", "twisted")
        untracked = git("ls-files", "--others", "--exclude-standard", "--", "pydio_ws", "twisted")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    digest = hashlib.sha256(changes)
    for name in untracked.split():
        digest.update((REPO_ROOT / name.decode()).read_bytes())
    return f"{commit}+dirty.{digest.hexdigest()[:6]}" if changes or untracked else commit


def workspace_of(index: int, workspaces: int) -> str:
    """The workspace of client `index`, or of message `index`."""
    return str(1 + index % workspaces)


def machine_cpu_times() -> tuple:
    """Busy (everything but idle, iowait and steal) and steal CPU seconds of the whole machine."""
    with open("/proc/stat") as stream:
        fields = [int(value) for value in stream.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def process_cpu_times() -> tuple:
    """User and system CPU seconds this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


class ServerProcess:
    """The server under test: a `twistd -n pydio-ws` subprocess, stopped by PID on exit."""

    def __init__(self, port: int, key: str, workdir: str, log_path: str, cpus, max_connections: int):
        self.port = port
        self._key = key
        self._max_connections = max_connections
        self._workdir = workdir
        self.log_path = log_path
        self._cpus = cpus
        self._process = None
        self.pinning = "none"

    def __enter__(self):
        twistd = Path(sys.executable).with_name("twistd")
        if not twistd.exists():
            raise RuntimeError(f"twistd not found next to {sys.executable}")
        command = [str(twistd), "-n", "--pidfile=", "pydio-ws",
                   "--public-host", HOST, "--public-port", str(self.port),
                   "--private-host", HOST, "--private-port", str(self.port)]
        taskset = shutil.which("taskset")
        if self._cpus and taskset:
            # taskset execs twistd, so the PID we hold is the server's own.
            command = [taskset, "-c", ",".join(map(str, sorted(self._cpus)))] + command
            self.pinning = f"taskset -c {','.join(map(str, sorted(self._cpus)))}"
        environment = {name: value for name, value in os.environ.items()
                       if not name.startswith("PYDIO_WS_")}
        environment.update({
            "PYTHONPATH": str(REPO_ROOT),
            "PYDIO_WS_PRIVATE_KEY": self._key,
            "PYDIO_WS_PRIVATE_GENERATED_KEY_FILE": os.path.join(self._workdir, "generated.key"),
            # Every client comes from 127.0.0.1: lift the per-address and total caps.
            "PYDIO_WS_LIMITS_MAX_CONNECTIONS": str(self._max_connections),
            "PYDIO_WS_LIMITS_MAX_CONNECTIONS_PER_IP": str(self._max_connections),
        })
        with open(self.log_path, "wb") as log:
            # A session of its own: a terminal's Ctrl-C reaches this script only, which
            # then stops the server by PID (twistd logs a traceback if signalled twice).
            self._process = subprocess.Popen(command, env=environment, cwd=self._workdir,
                                             stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        if self._cpus and not taskset:
            os.sched_setaffinity(self._process.pid, self._cpus)
            self.pinning = f"sched_setaffinity {sorted(self._cpus)}"
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False

    @property
    def pid(self) -> int:
        return self._process.pid

    def exited(self):
        """The exit status if the server has exited, else None."""
        return self._process.poll()

    def cpu_times(self) -> tuple:
        """User and system CPU seconds the server has used so far."""
        with open(f"/proc/{self.pid}/stat") as stream:
            fields = stream.read().rpartition(")")[2].split()
        # fields[0] is field 3 (state) of proc(5); utime and stime are fields 14 and 15.
        ticks = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / ticks, int(fields[12]) / ticks

    def memory_mib(self) -> dict:
        """Current and peak resident set size of the server, in MiB."""
        values = {}
        with open(f"/proc/{self.pid}/status") as stream:
            for line in stream:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    values[name] = round(int(rest.split()[0]) / 1024, 1)
        return {"rss_mib": values.get("VmRSS"), "peak_rss_mib": values.get("VmHWM")}

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT; returns once the process is reaped."""
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def log_summary(self) -> dict:
        """Line counts of the server's output, its first and last warning/error lines."""
        lines = notable = 0
        first, last = [], None
        with open(self.log_path, encoding="utf-8", errors="replace") as stream:
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


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written at once."""

    def __init__(self, body: bytes):
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def cpu_figures(user: float, system: float, wall_seconds: float, deliveries: int) -> dict:
    """CPU use of one side over the publish phase, and the deliveries per CPU second it implies."""
    cpu_seconds = user + system
    return {
        "cpu_seconds_publish": round(cpu_seconds, 3),
        "system_share": round(system / cpu_seconds, 3) if cpu_seconds else None,
        "cpu_utilization_publish": round(cpu_seconds / wall_seconds, 3),
        "deliveries_per_cpu_second": round(deliveries / cpu_seconds) if cpu_seconds else None,
    }


def percentile(ordered, fraction: float):
    """Nearest-rank percentile of an ascending sequence."""
    return ordered[max(1, math.ceil(len(ordered) * fraction)) - 1]


class FanoutBench:
    """One benchmark run against a started ServerProcess, inside the reactor."""

    def __init__(self, args, server: ServerProcess, key: str, reactor):
        self._args = args
        self._server = server
        self._key = key
        self._reactor = reactor
        self._base = f"http://{HOST}:{server.port}"
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = args.in_flight
        self._agent = Agent(reactor, pool=self._pool)
        self._key_headers = {b"X-Pydio-Key": [key.encode("ascii")]}
        self.recorder = Recorder(args.messages)
        self._expected_per_workspace = {}
        self.phase = "starting"
        self.publish_errors = 0
        self.first_publish_error = None
        self.first_publish_ns = None
        self.last_answer_ns = None
        self.connect_seconds = None
        self.deadline_hit = False

    async def run(self) -> dict:
        """Start-up, connect, publish, wait; returns the result document."""
        await self._wait_until_ready()
        self.phase = "connecting"
        started = time.perf_counter()
        clients = await self._connect_all()
        self.connect_seconds = time.perf_counter() - started
        self.phase = "registering"
        await self._wait_until_registered()
        cpu_before = (time.perf_counter(), *self._server.cpu_times(), *process_cpu_times(),
                      *machine_cpu_times())
        self.phase = "publishing"
        await self._publish_all()
        self.phase = "waiting for stragglers"
        await self._wait_for_stragglers()
        cpu_after = (time.perf_counter(), *self._server.cpu_times(), *process_cpu_times(),
                     *machine_cpu_times())
        cpu = tuple(after - before for after, before in zip(cpu_after, cpu_before))
        end_ns = self.recorder.last_ns or self.last_answer_ns
        phase_seconds = (end_ns - self.first_publish_ns) / 1e9
        status = await self._status()
        self.phase = "done"
        self.recorder.finishing = True
        await self._pool.closeCachedConnections()
        for client in clients:
            if client.transport is not None:
                client.transport.abortConnection()
        return self._result(phase_seconds, cpu, status)

    async def _sleep(self, seconds: float) -> None:
        await task.deferLater(self._reactor, seconds, lambda: None)

    async def _status(self, timeout: float = REQUEST_TIMEOUT) -> dict:
        """The server's GET /private/status document."""
        response = await self._agent.request(
            b"GET", f"{self._base}{PRIVATE_PATH}/status".encode("ascii")
        ).addTimeout(timeout, self._reactor)
        body = await readBody(response)
        code = response.code
        if code != 200:
            raise RuntimeError(f"GET {PRIVATE_PATH}/status answered {code}: {body[:200]!r}")
        return json.loads(body)

    async def _wait_until_ready(self) -> None:
        give_up = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self._server.exited() is not None:
                raise RuntimeError(f"server exited with status {self._server.exited()} at start-up")
            try:
                await self._status(POLL_TIMEOUT)
                return
            except (ConnectError, ResponseNeverReceived, defer.TimeoutError):
                pass
            if time.monotonic() > give_up:
                raise RuntimeError(f"server not answering after {STARTUP_TIMEOUT} s")
            await self._sleep(POLL_INTERVAL)

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
            registered = (await self._status())["connections"]["registered"]
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
        url = f"{self._base}{PRIVATE_PATH}".encode("ascii")
        headers = {**self._key_headers, b"Content-Type": [b"application/json"]}
        workspaces, payload = self._args.workspaces, self._args.payload
        for sequence in sequences:
            sent = time.perf_counter_ns()
            content = f"{sequence} {sent} ".ljust(payload, "x")
            body = json.dumps({"REPO_ID": workspace_of(sequence, workspaces), "CONTENT": content})
            if self.first_publish_ns is None:
                self.first_publish_ns = sent
            response = await self._agent.request(
                b"POST", url, Headers(headers), BytesProducer(body.encode("utf-8"))
            ).addTimeout(REQUEST_TIMEOUT, self._reactor)
            answer = await readBody(response)
            self.last_answer_ns = time.perf_counter_ns()
            if response.code != 200 or json.loads(answer) != {"published": 1}:
                self.publish_errors += 1
                if self.first_publish_error is None:
                    self.first_publish_error = f"{response.code} {answer[:200]!r}"
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


def start_logging() -> None:
    """Warnings and errors of this process (e.g. unhandled Deferred failures) to stderr."""
    levels = LogLevelFilterPredicate(LogLevel.warn)
    # Autobahn warns once per refused handshake; the JSON line reports the first refusal.
    levels.setLogLevelForNamespace("autobahn", LogLevel.error)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [levels])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def run_in_reactor(args, server: ServerProcess, key: str) -> dict:
    """Run a FanoutBench under the global reactor, bounded by `--deadline`."""
    from twisted.internet import reactor

    bench = FanoutBench(args, server, key, reactor)
    outcome = {}
    running = defer.Deferred.fromCoroutine(bench.run())

    def expire():
        bench.deadline_hit = True
        running.cancel()

    def stop():
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    deadline = reactor.callLater(args.deadline, expire)
    # Should cancellation ever not unwind, stop the reactor anyway a little later.
    backstop = reactor.callLater(args.deadline + STOP_TIMEOUT, stop)

    def finished(result):
        if isinstance(result, dict):
            outcome["result"] = result
        elif bench.deadline_hit:
            outcome["result"] = bench.partial(f"deadline of {args.deadline} s exceeded")
        else:
            outcome["result"] = bench.partial(f"{result.type.__name__}: {result.getErrorMessage()}")
        for call in (deadline, backstop):
            if call.active():
                call.cancel()
        reactor.callWhenRunning(stop)

    running.addBoth(finished)
    reactor.run()
    if "result" in outcome:
        return outcome["result"]
    return bench.partial(f"deadline of {args.deadline} s exceeded" if bench.deadline_hit else "interrupted")


def succeeded(result: dict) -> bool:
    return ("error" not in result and result["lost_deliveries"] == 0
            and result["unexpected_deliveries"] == 0 and result["publish_errors"] == 0
            and result["clients_closed_early"] == 0)


def main(argv=None) -> int:
    args = parse_args(argv)
    open_files = raise_open_file_limit()
    if open_files < args.clients + 100:
        sys.exit(f"open-file limit {open_files} is too low for {args.clients} clients")
    start_logging()
    # readBody warns when a short response arrived whole before it was called (the
    # transport it then sees has no abortConnection); harmless here.
    warnings.filterwarnings("ignore", "Using readBody with a transport", DeprecationWarning)
    available = os.sched_getaffinity(0)
    pinned = len(available) > 1 and SERVER_CPU in available
    key = secrets.token_urlsafe(48)
    version = code_version()
    with tempfile.TemporaryDirectory(prefix="pydio-ws-bench-") as workdir:
        log_path = args.server_log or os.path.join(workdir, "server.log")
        server = ServerProcess(free_port(), key, workdir, log_path, {SERVER_CPU} if pinned else None,
                               max_connections=args.clients + CONNECTION_MARGIN)
        with server:
            if pinned:
                os.sched_setaffinity(0, available - {SERVER_CPU})
            result = run_in_reactor(args, server, key)
        result["server_log"] = server.log_summary()
    result["pinning"] = {"server": server.pinning,
                         "client": sorted(os.sched_getaffinity(0)) if pinned else "none"}
    result["open_file_limit"] = open_files
    result["code"] = version
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if succeeded(result) else 1


if __name__ == "__main__":
    sys.exit(main())
