"""Soak test: thousands of browsers connecting, registering, leaving and coming back while
messages are published at a steady rate; nothing accepted may be lost to a browser that
stayed connected.

Usage (from the repository root, with the project's virtualenv):

    .venv/bin/python bench/soak.py --clients 2000 --churners 1000 --duration 120
    .venv/bin/python bench/soak.py --clients 2000 --churners 1000 --per-ip-cap 2500 \\
        --bad-clients 20 --max-auth-failures 50 --duration 60

What it does:

1. Starts the real server, `twistd -n pydio-ws`, on a free 127.0.0.1 port (one shared
   listener), pinned to CPU 0 with `taskset -c 0`, and pins this process, the load
   generator, to the other CPUs (the approach of `bench/fanout.py`, with the helpers both
   share in `bench/_common.py`). The server's settings reach it through its environment
   only: a random private key, `allowed_origins`, and the connection caps: by default
   high enough for every client (all come from 127.0.0.1), or `--per-ip-cap` to leave a
   cap that churners run into.
2. Connects `--clients` stable clients (Autobahn/Twisted, at most `--connect-concurrency`
   handshakes at a time); client i sends `register:<w>`, w = 1 + i % W. GET
   /private/status is polled until the server counts exactly these registrations.
3. The soak phase, `--duration` seconds. At once:
   - a publisher POSTs to /private at a steady open-loop rate of `--rate` messages/s
     (a request is sent when it is due, whether or not earlier ones were answered; at
     most `--max-in-flight` outstanding, a due message over that is skipped and counted).
     Message s goes to workspace 1 + s % W; its CONTENT is "<s> <send time in ns> "
     padded with "x" to `--payload` bytes;
   - `--churners` clients loop: connect (a share of them abort mid-handshake), register
     on a random workspace (a share switch workspace half-way or unregister), stay
     `--min-stay`..`--max-stay` seconds, close cleanly or abort the TCP connection, wait
     up to `--max-gap`, reconnect. A refused handshake is counted by status and retried
     after a short back-off;
   - `--bad-clients` clients loop from `--bad-source` (another loopback address, so the
     per-IP failure limit they trigger blocks only them): half present a token signed
     with a wrong key (401, then 429 once `max_auth_failures` is reached), half a
     forbidden Origin (403), one attempt every `--bad-interval` seconds each;
   - a sampler reads the server's RSS, CPU and /status every `--sample-interval` seconds.
4. Stops churners and bad clients, waits for every POST to be answered, then up to
   `--straggler-wait` seconds for deliveries still on their way, and checks the end state:
   /status must count exactly the stable clients, open and registered, once the churners
   are gone.
5. Capacity probe (when the room left is at most `--probe-max` connections): opens as
   many connections as the lower of the two caps leaves room for next to the stable
   clients, then one more. All must open and the extra one must get 503; a leaked connection count shows
   up here as an early 503.
6. Closes the stable clients, waits for the server to count 0 open connections, reads its
   RSS once more, prints one JSON line and stops the server by its PID (SIGTERM, then
   SIGKILL), whatever happened before. `--deadline` bounds the whole run.

Loss accounting. A stable client is registered (confirmed through /status) before the
first message is published, and stays connected, so it must receive every message
published to its workspace that the server accepted (200), exactly once. Each stable
client keeps one counter per message of its workspace; `lost` counts accepted messages a
stable client never got, `duplicated` extra copies, `misrouted` messages of another
workspace. Messages whose POST failed or timed out are left out of the expectation
(`received_for_failed_publish` counts those that arrived anyway). Churners are left out of
the loss count (there is no acknowledgement of a register, so when their subscription
started is unknown); their duplicates and misrouted messages are still counted.

Main fields of the JSON line:

- `stable_deliveries`: expected / received / lost / duplicated / misrouted for stable
  clients, and the stable clients the server closed before the end (`closed_early`).
- `churn`: cycles, connects, disconnects (clean closes and aborts), handshake aborts,
  workspace switches and unregisters, refused attempts, deliveries, duplicates.
- `messages`: published (accepted), publish errors, skipped over `--max-in-flight`, rate.
- `latency_ms`: p50 / p90 / p99 / p99.9 / max of (stable client receive - POST send), both
  read from this process's monotonic clock; `deliveries_later_than_1s`;
  `publish_round_trip_ms` (POST sent - answer read); `churner_tcp_connect_ms` and
  `churner_handshake_ms` (TCP connect, then opening handshake, of churners in the soak).
- `server`: RSS at start (idle), once the stable clients are registered, at the end of
  the soak, after every client closed, and the peak (VmHWM); CPU seconds of the soak
  phase and in total; `server_listen_backlog`, the listen queue length `ss` reports.
- `refusals`: the server's `handshakes_refused` by status during the soak phase, and
  what the clients saw (status codes from the failed upgrade, or how the attempt ended).
  A churner that aborts its own handshake may miss the 503 the server sent, so the
  server's count can be slightly higher.
- `slow_consumer_closes`: the server's counter and the 1008 closes stable clients saw.
- `server_log`: lines, errors (error/critical level, tracebacks, unhandled errors) and
  warnings, with the first lines of each. Autobahn logs each refused handshake at warn.
- `end_state`, `capacity_probe`: see steps 4 and 5.
- `client`: this process's CPU use over the soak phase, its reactor lag and its garbage
  collection pauses; they add to the latencies above without being the server's.
- `machine`: CPU the rest of the machine used meanwhile, and the kernel's machine-wide
  count of connections turned away by a full listen queue (`ListenOverflows`; each
  costs the client a SYN retransmission, 1 s at first).
- `timeline`: one sample per `--sample-interval`: server RSS and CPU, /status counts,
  the listen queue length, the client's largest reactor lag.
- `checks` and `passed`: the exit status is 1 unless every check holds.

Only 127.0.0.1 is ever connected to or listened on (bad clients connect from another
loopback source address, `--bad-source`).
"""

import argparse
import bisect
import gc
import json
import math
import random
import re
import resource
import secrets
import shutil
import subprocess
import sys
import time
from array import array
from collections import Counter

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeoutError

from _common import (CONNECTION_MARGIN, HOST, PUBLIC_PATH, PrivateSide, ServerProcess, cpu_since,
                     cpu_snapshot, percentile, raise_open_file_limit, run_with_server,
                     tcp_ext_counters, workspace_of)
from pydio_ws.auth import make_token

ALLOWED_ORIGIN = "http://pydio.localhost"
FORBIDDEN_ORIGIN = "http://evil.localhost"
REQUEST_TIMEOUT = 30.0
CONNECT_TIMEOUT = 30.0
OPEN_TIMEOUT = 40.0
CLOSE_TIMEOUT = 15.0
SETTLE_TIMEOUT = 60.0
POLL_INTERVAL = 0.2
TOKEN_LIFETIME = 7200.0
SATURATED = 0.9
LAG_INTERVAL = 0.05
REFUSED_BACKOFF = (0.5, 2.0)
MAX_CYCLES_PER_SECOND = 20
LOG_EXCERPT_LINES = 10
LISTEN_COUNTERS = ("ListenOverflows", "ListenDrops", "SyncookiesSent")
_UPGRADE_FAILED = re.compile(r"upgrade failed \[(\d{3})\]")
_ERROR_LINE = re.compile(r"#(error|critical)\]|Traceback|Unhandled")
_WARNING_LINE = re.compile(r"#warn\]")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Soak test of pydio-ws: stable and churning clients under a steady publish rate.")
    parser.add_argument("--clients", type=int, default=2000, help="stable clients (register once, stay)")
    parser.add_argument("--churners", type=int, default=1000, help="clients that connect, stay, leave, repeat")
    parser.add_argument("--workspaces", type=int, default=20, help="workspaces clients and messages are spread over")
    parser.add_argument("--rate", type=float, default=50.0, help="messages published per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of the soak phase")
    parser.add_argument("--payload", type=int, default=128, help="CONTENT size in bytes (at least)")
    parser.add_argument("--min-stay", type=float, default=1.0, help="shortest churner stay, seconds")
    parser.add_argument("--max-stay", type=float, default=10.0, help="longest churner stay, seconds")
    parser.add_argument("--max-gap", type=float, default=1.0, help="longest pause between churner cycles")
    parser.add_argument("--abort-share", type=float, default=0.2,
                        help="share of churner disconnects that abort TCP instead of closing")
    parser.add_argument("--handshake-abort-share", type=float, default=0.05,
                        help="share of churner connects aborted during the opening handshake")
    parser.add_argument("--switch-share", type=float, default=0.2,
                        help="share of churner stays that switch workspace (or unregister) half-way")
    parser.add_argument("--per-ip-cap", type=int,
                        help="server max_connections_per_ip (default: room for every client)")
    parser.add_argument("--max-connections", type=int,
                        help="server max_connections (default: room for every client)")
    parser.add_argument("--bad-clients", type=int, default=0,
                        help="clients that keep trying with a wrong token or a forbidden origin")
    parser.add_argument("--bad-interval", type=float, default=1.0, help="seconds between a bad client's attempts")
    parser.add_argument("--bad-source", default="127.0.0.2",
                        help="loopback address bad clients connect from")
    parser.add_argument("--max-auth-failures", type=int,
                        help="server max_auth_failures (default: the server's own)")
    parser.add_argument("--max-in-flight", type=int, default=64, help="publish requests outstanding at most")
    parser.add_argument("--connect-concurrency", type=int, default=200,
                        help="opening handshakes in progress at most")
    parser.add_argument("--sample-interval", type=float, default=5.0, help="seconds between server samples")
    parser.add_argument("--straggler-wait", type=float, default=30.0,
                        help="seconds to wait for deliveries after the last publish is answered")
    parser.add_argument("--probe-max", type=int, default=5000,
                        help="largest capacity probe (connections) to run at the end")
    parser.add_argument("--seed", type=int, default=1, help="seed of the churners' random choices")
    parser.add_argument("--deadline", type=float, help="seconds the whole run may take (default duration + 300)")
    parser.add_argument("--server-log", metavar="FILE",
                        help="keep the server's output in FILE (default: a temporary file, deleted)")
    args = parser.parse_args(argv)
    for name in ("clients", "workspaces", "payload", "max_in_flight", "connect_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("churners", "bad_clients"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if args.workspaces > args.clients:
        parser.error("--workspaces must not exceed --clients")
    if not 0 < args.rate <= 10000 or args.duration <= 0:
        parser.error("--rate must be in (0, 10000] and --duration positive")
    if not 0 <= args.min_stay <= args.max_stay or args.max_gap < 0 or args.bad_interval <= 0:
        parser.error("need 0 <= --min-stay <= --max-stay, --max-gap >= 0, --bad-interval > 0")
    for name in ("abort_share", "handshake_abort_share", "switch_share"):
        if not 0 <= getattr(args, name) <= 1:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 1")
    room = args.clients + args.churners + CONNECTION_MARGIN
    args.per_ip_cap = args.per_ip_cap or room
    args.max_connections = args.max_connections or room + args.bad_clients
    if min(args.per_ip_cap, args.max_connections) < args.clients:
        parser.error("the connection caps must leave room for every stable client")
    if not args.bad_source.startswith("127."):
        parser.error("--bad-source must be a loopback address (127.x.y.z)")
    args.deadline = args.deadline or args.duration + 300.0
    return args


def log_summary(path: str) -> dict:
    """Line count of the server's output, error and warning lines with the first few of each."""
    lines = 0
    counts = Counter()
    first = {"errors": [], "warnings": []}
    with open(path, encoding="utf-8", errors="replace") as stream:
        for line in stream:
            lines += 1
            kind = ("errors" if _ERROR_LINE.search(line)
                    else "warnings" if _WARNING_LINE.search(line) else None)
            if kind:
                counts[kind] += 1
                if len(first[kind]) < LOG_EXCERPT_LINES:
                    first[kind].append(line.rstrip()[:300])
    return {"lines": lines, "errors": counts["errors"], "warnings": counts["warnings"],
            "first_errors": first["errors"], "first_warnings": first["warnings"]}


def listen_queue(port: int):
    """(queued, backlog) of the listening socket on 127.0.0.1:`port`, from `ss`; None without ss."""
    ss = shutil.which("ss")
    if not ss:
        return None
    try:
        output = subprocess.run([ss, "-Hlnt", f"sport = :{port}"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.split()
        return int(output[1]), int(output[2])
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def listen_counters() -> Counter:
    """Machine-wide TCP counters of connections a full listen queue turned away."""
    values = tcp_ext_counters()
    return Counter({name: values.get(name, 0) for name in LISTEN_COUNTERS})


def refusal_label(reason: str) -> str:
    """How a handshake that never opened ended, from Autobahn's close reason."""
    match = _UPGRADE_FAILED.search(reason or "")
    if match:
        return match.group(1)
    if "opening handshake timeout" in (reason or ""):
        return "handshake timeout"
    return "dropped before open"


class GcPauses:
    """Durations of this process's garbage collections, which stall its reactor."""

    def __init__(self):
        self.pauses = array("d")
        self._started = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append(time.perf_counter() - self._started)

    def summary(self) -> dict:
        return {"collections": len(self.pauses),
                "max_ms": round(max(self.pauses, default=0.0) * 1000, 1),
                "total_ms": round(sum(self.pauses) * 1000)}


class Refused(Exception):
    """A connection attempt that did not open; `label` is the status or how it ended."""

    def __init__(self, label: str):
        super().__init__(label)
        self.label = label


class Totals:
    """Counters shared by every client of the run; the receive hot path writes here."""

    def __init__(self, workspaces: int, slots: int):
        self.workspaces = workspaces
        self.slots = slots
        self.latencies = array("q")
        self.publish_round_trips = array("q")
        self.connect_times = array("d")
        self.open_times = array("d")
        self.stable_received = 0
        self.stable_unique = 0
        self.stable_duplicated = 0
        self.stable_misrouted = 0
        self.stable_closed_early = Counter()
        self.churn = Counter()
        self.refusals = {"stable": Counter(), "churners": Counter(), "bad": Counter()}
        self.finishing = False


class StableClient(WebSocketClientProtocol):
    """A client that registers once and stays; one delivery counter per message of its workspace."""

    def onOpen(self):
        self.sendMessage(self.factory.register_frame)
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        factory = self.factory
        totals = factory.totals
        now = time.perf_counter_ns()
        sequence, sent, _ = payload.split(b" ", 2)
        sequence = int(sequence)
        slot, workspace = divmod(sequence, totals.workspaces)
        if workspace != factory.workspace or slot >= totals.slots:
            totals.stable_misrouted += 1
            return
        counts = factory.counts
        seen = counts[slot]
        if seen:
            totals.stable_duplicated += 1
        else:
            totals.stable_unique += 1
        if seen < 255:
            counts[slot] = seen + 1
        totals.stable_received += 1
        totals.latencies.append(now - int(sent))

    def onClose(self, wasClean, code, reason):
        factory = self.factory
        if not factory.opened.called:
            factory.opened.errback(Refused(refusal_label(reason)))
        elif not factory.totals.finishing:
            factory.totals.stable_closed_early[f"{code} {reason}"[:120]] += 1


class StableFactory(WebSocketClientFactory):
    protocol = StableClient

    def __init__(self, url: str, index: int, totals: Totals):
        super().__init__(url, origin=ALLOWED_ORIGIN)
        self.workspace = index % totals.workspaces
        self.register_frame = f"register:{1 + self.workspace}".encode("ascii")
        self.counts = bytearray(totals.slots)
        self.totals = totals
        self.opened = defer.Deferred()
        self.setProtocolOptions(utf8validateIncoming=False, openHandshakeTimeout=OPEN_TIMEOUT)


class SessionClient(WebSocketClientProtocol):
    """One connection of a churner or a bad client; it reports to its factory."""

    def onOpen(self):
        if self.factory.register_frame:
            self.sendMessage(self.factory.register_frame)
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.received(payload)

    def onClose(self, wasClean, code, reason):
        factory = self.factory
        if not factory.opened.called:
            factory.opened.errback(Refused(refusal_label(reason)))
        if not factory.closed.called:
            factory.closed.callback(code)


class SessionFactory(WebSocketClientFactory):
    """One session: `opened` fires with the protocol (or fails with Refused), `closed`
    with the close code. Counts what arrives, duplicates and messages of a workspace the
    session never registered on."""

    protocol = SessionClient

    def __init__(self, url: str, totals: Totals, origin: str, workspace=None):
        super().__init__(url, origin=origin)
        self.totals = totals
        self.register_frame = None if workspace is None else f"register:{1 + workspace}".encode("ascii")
        self.listening = set() if workspace is None else {workspace}
        self.seen = set()
        self.opened = defer.Deferred()
        self.closed = defer.Deferred()
        self.setProtocolOptions(utf8validateIncoming=False, openHandshakeTimeout=OPEN_TIMEOUT)

    def received(self, payload: bytes) -> None:
        churn = self.totals.churn
        sequence = int(payload[:payload.index(b" ")])
        churn["deliveries"] += 1
        if sequence in self.seen:
            churn["duplicated"] += 1
        self.seen.add(sequence)
        if sequence % self.totals.workspaces not in self.listening:
            churn["misrouted"] += 1


class Soak:
    """One soak run against a started server, inside the reactor."""

    def __init__(self, args, server: ServerProcess, key: str, reactor):
        self._args = args
        self._server = server
        self._key = key
        self._reactor = reactor
        self._private = PrivateSide(reactor, server.port, key, args.max_in_flight, REQUEST_TIMEOUT)
        self._max_messages = math.ceil(args.rate * args.duration) + 1
        self.totals = Totals(args.workspaces, math.ceil(self._max_messages / args.workspaces) + 1)
        # Per message: 0 not sent, 1 pending, 2 accepted, 3 failed.
        self._outcome = bytearray(self._max_messages)
        self._stable_per_workspace = Counter(i % args.workspaces for i in range(args.clients))
        self._limiter = defer.DeferredSemaphore(args.connect_concurrency)
        self._expires_at = time.time() + TOKEN_LIFETIME
        self._rng = random.Random(args.seed)
        self._stable = []
        self._in_flight = set()
        self._sent = 0
        self._skipped = 0
        self._publish_errors = Counter()
        self._soak_start = None
        self._soak_end = None
        self._lags = array("d")
        self._lag_last = 0.0
        self._samples = []
        self._gc = GcPauses()
        self._listen_queue = None
        self._listen_before = Counter()
        self._listen_turned_away = {}
        self.phase = "starting"
        self.memory = {}

    # -- helpers ---------------------------------------------------------------------

    def _now(self) -> float:
        return self._reactor.seconds()

    async def _sleep(self, seconds: float) -> None:
        await task.deferLater(self._reactor, max(0.0, seconds), lambda: None)

    async def _wait_for_status(self, predicate, timeout: float):
        """Poll /status until `predicate(status)` holds; returns the last status and whether it held."""
        give_up = self._now() + timeout
        while True:
            status = await self._private.status()
            if predicate(status) or self._now() > give_up:
                return status, predicate(status)
            await self._sleep(POLL_INTERVAL)

    def _url(self, user: str, repos: dict, key: str = None) -> str:
        token = make_token(key or self._key, user, repos, self._expires_at)
        return f"ws://{HOST}:{self._server.port}{PUBLIC_PATH}?token={token}"

    async def _open(self, factory, source: str = None, abort_within: float = None, timed: bool = False):
        """Connect `factory`; returns the open protocol or raises Refused. With
        `abort_within`, the connection is aborted that many seconds (at most) after the
        TCP connect unless it opened first. `timed` records the TCP connect time and,
        when it opens, the opening handshake time."""
        endpoint = TCP4ClientEndpoint(self._reactor, HOST, self._server.port, timeout=CONNECT_TIMEOUT,
                                      bindAddress=(source, 0) if source else None)
        async with self._limiter:
            started = time.perf_counter()
            try:
                protocol = await endpoint.connect(factory)
            except (ConnectError, ConnectTimeoutError) as error:
                raise Refused(f"connect failed: {type(error).__name__}") from None
            connected = time.perf_counter()
            if timed:
                self.totals.connect_times.append(connected - started)
            if abort_within is not None:
                def abort():
                    if not factory.opened.called and protocol.transport is not None:
                        protocol.transport.abortConnection()
                self._reactor.callLater(self._rng.uniform(0, abort_within), abort)
            try:
                opened = await factory.opened.addTimeout(OPEN_TIMEOUT + 5, self._reactor)
            except defer.TimeoutError:
                if protocol.transport is not None:
                    protocol.transport.abortConnection()
                raise Refused("open timeout") from None
            if timed:
                self.totals.open_times.append(time.perf_counter() - connected)
            return opened

    # -- the run ---------------------------------------------------------------------

    async def run(self) -> dict:
        args = self._args
        await self._private.wait_until_ready(self._server, POLL_INTERVAL)
        self.memory["start"] = self._server.memory_mib()["rss_mib"]
        self.phase = "connecting stable clients"
        started = self._now()
        await self._connect_stable()
        connect_seconds = self._now() - started
        self.phase = "confirming registrations"
        expected = {str(1 + w): n for w, n in self._stable_per_workspace.items()}
        status, ok = await self._wait_for_status(
            lambda s: s["connections"]["registered"] == expected, SETTLE_TIMEOUT)
        if not ok:
            raise RuntimeError(f"registrations not confirmed: {status['connections']}")
        status_before = status
        self.memory["connected"] = self._server.memory_mib()["rss_mib"]
        # The stable clients live until the end: keep the collector from walking them
        # again and again, which stalls this reactor for hundreds of ms with thousands
        # of clients and shows up as latency that is not the server's.
        gc.collect()
        gc.freeze()

        self.phase = "soak"
        self._gc.start()
        self._listen_queue = listen_queue(self._server.port)
        self._listen_before = listen_counters()
        before = cpu_snapshot(self._server)
        self._soak_start = self._now()
        self._soak_end = self._soak_start + args.duration
        lag = task.LoopingCall(self._measure_lag)
        lag.clock = self._reactor
        self._lag_last = self._now()
        lag_done = lag.start(LAG_INTERVAL, now=False)
        workers = [defer.Deferred.fromCoroutine(self._publish())]
        workers.append(defer.Deferred.fromCoroutine(self._sample()))
        workers += [defer.Deferred.fromCoroutine(self._churn(i, random.Random(args.seed * 1_000_003 + i)))
                    for i in range(args.churners)]
        workers += [defer.Deferred.fromCoroutine(self._bad(i)) for i in range(args.bad_clients)]
        await defer.gatherResults(workers, consumeErrors=True)
        self.phase = "draining"
        await self._drain_publishes()
        await self._wait_for_stragglers()
        lag.stop()
        await lag_done
        self._gc.stop()
        cpu = cpu_since(self._server, before)
        soak_seconds = self._now() - self._soak_start
        after_listen = listen_counters()
        self._listen_turned_away = {name: after_listen[name] - self._listen_before[name]
                                    for name in LISTEN_COUNTERS}
        self.memory["end"] = self._server.memory_mib()["rss_mib"]

        self.phase = "checking end state"
        status_end, end_ok = await self._wait_for_status(
            lambda s: s["connections"]["open"] == args.clients
            and s["connections"]["registered"] == expected, SETTLE_TIMEOUT)
        probe = await self._capacity_probe()

        self.phase = "closing"
        self.totals.finishing = True
        await self._close_stable()
        status_closed, closed_ok = await self._wait_for_status(
            lambda s: s["connections"]["open"] == 0 and not s["connections"]["registered"], SETTLE_TIMEOUT)
        self.memory["after_all_closed"] = self._server.memory_mib()["rss_mib"]
        self.memory["peak"] = self._server.memory_mib()["peak_rss_mib"]
        await self._private.close()
        self.phase = "done"
        return self._result(connect_seconds, soak_seconds, cpu, status_before, status_end, end_ok,
                            probe, status_closed, closed_ok)

    async def _connect_stable(self) -> None:
        args = self._args
        failures = Counter()

        async def connect(index: int) -> None:
            workspace = workspace_of(index, args.workspaces)
            factory = StableFactory(self._url(f"stable-{index}", {workspace: "r"}), index, self.totals)
            try:
                self._stable.append(await self._open(factory))
            except Refused as refusal:
                failures[refusal.label] += 1
                self.totals.refusals["stable"][refusal.label] += 1

        await defer.gatherResults([defer.Deferred.fromCoroutine(connect(i)) for i in range(args.clients)])
        if failures:
            raise RuntimeError(f"{sum(failures.values())} of {args.clients} stable clients did not "
                               f"connect: {dict(failures)}")

    def _measure_lag(self) -> None:
        now = self._now()
        self._lags.append(max(0.0, now - self._lag_last - LAG_INTERVAL))
        self._lag_last = now

    # -- publishing --------------------------------------------------------------------

    async def _publish(self) -> None:
        """Send message s at soak start + s / rate, open loop, until the soak ends."""
        args = self._args
        interval = max(0.005, 1.0 / args.rate)
        while self._sent < self._max_messages:
            now = self._now()
            if now >= self._soak_end:
                break
            due = min(self._max_messages, int((now - self._soak_start) * args.rate) + 1)
            while self._sent < due:
                sequence = self._sent
                self._sent += 1
                if len(self._in_flight) >= args.max_in_flight:
                    self._skipped += 1
                    continue
                self._outcome[sequence] = 1
                posting = defer.Deferred.fromCoroutine(self._post(sequence))
                self._in_flight.add(posting)
                posting.addBoth(lambda _, posting=posting: self._in_flight.discard(posting))
            await self._sleep(min(interval, self._soak_end - now))

    async def _post(self, sequence: int) -> None:
        args = self._args
        sent = time.perf_counter_ns()
        content = f"{sequence} {sent} ".ljust(args.payload, "x")
        try:
            code, answer = await self._private.publish(workspace_of(sequence, args.workspaces), content)
        except Exception as error:
            self._outcome[sequence] = 3
            self._publish_errors[type(error).__name__] += 1
            return
        if code == 200 and json.loads(answer) == {"published": 1}:
            self._outcome[sequence] = 2
            self.totals.publish_round_trips.append(time.perf_counter_ns() - sent)
        else:
            self._outcome[sequence] = 3
            self._publish_errors[f"{code} {answer[:100]!r}"] += 1

    async def _drain_publishes(self) -> None:
        if self._in_flight:
            pending = defer.DeferredList(list(self._in_flight))
            try:
                await pending.addTimeout(REQUEST_TIMEOUT + 5, self._reactor)
            except defer.TimeoutError:
                pass

    def _expected_stable(self) -> int:
        workspaces = self._args.workspaces
        return sum(self._stable_per_workspace[s % workspaces]
                   for s in range(self._sent) if self._outcome[s] == 2)

    async def _wait_for_stragglers(self) -> None:
        expected = self._expected_stable()
        give_up = self._now() + self._args.straggler_wait
        while self.totals.stable_unique < expected and self._now() < give_up:
            await self._sleep(0.1)

    # -- churners and bad clients ------------------------------------------------------

    async def _churn(self, index: int, rng: random.Random) -> None:
        """Connect, register, stay, leave, pause, again; until the soak ends."""
        args, churn = self._args, self.totals.churn
        url = self._url(f"churner-{index}", {str(1 + w): "r" for w in range(args.workspaces)})
        # Start spread out, as if the churners had been cycling before.
        await self._sleep(min(rng.uniform(0, args.max_stay), self._soak_end - self._now()))
        for _ in range(max(1, int(args.duration * MAX_CYCLES_PER_SECOND))):
            if self._now() >= self._soak_end:
                return
            churn["cycles"] += 1
            workspace = rng.randrange(args.workspaces)
            factory = SessionFactory(url, self.totals, ALLOWED_ORIGIN, workspace)
            aborting = rng.random() < args.handshake_abort_share
            try:
                client = await self._open(factory, abort_within=0.003 if aborting else None, timed=True)
            except Refused as refusal:
                if aborting and refusal.label == "dropped before open":
                    churn["handshake_aborts"] += 1
                    continue
                self.totals.refusals["churners"][refusal.label] += 1
                churn["refused"] += 1
                await self._sleep(min(rng.uniform(*REFUSED_BACKOFF), self._soak_end - self._now()))
                continue
            churn["connects"] += 1
            stay = rng.uniform(args.min_stay, args.max_stay)
            if rng.random() < args.switch_share:
                await self._sleep(min(stay / 2, self._soak_end - self._now()))
                if not factory.closed.called:
                    other = rng.randrange(args.workspaces)
                    if rng.random() < 0.25:
                        client.sendMessage(b"unregister:")
                        churn["unregisters"] += 1
                    else:
                        # Messages of the old workspace may still be on their way.
                        factory.listening.add(other)
                        client.sendMessage(f"register:{1 + other}".encode("ascii"))
                        churn["switches"] += 1
                stay /= 2
            await self._sleep(min(stay, self._soak_end - self._now()))
            await self._leave(client, factory, rng.random() < args.abort_share)
            await self._sleep(min(rng.uniform(0, args.max_gap), self._soak_end - self._now()))

    async def _leave(self, client, factory, abort: bool) -> None:
        churn = self.totals.churn
        if factory.closed.called:
            churn["closed_by_server"] += 1
            return
        if abort:
            client.transport.abortConnection()
            churn["aborts"] += 1
        else:
            client.sendClose(1000)
            churn["clean_closes"] += 1
        try:
            await factory.closed.addTimeout(CLOSE_TIMEOUT, self._reactor)
        except defer.TimeoutError:
            churn["close_timeouts"] += 1
            if client.transport is not None:
                client.transport.abortConnection()
        churn["disconnects"] += 1

    async def _bad(self, index: int) -> None:
        """Try to open a socket with a wrong token (even index) or a forbidden origin (odd)."""
        args = self._args
        wrong_key = index % 2 == 0
        url = self._url(f"bad-{index}", {"1": "r"}, key=secrets.token_urlsafe(32) if wrong_key else None)
        origin = ALLOWED_ORIGIN if wrong_key else FORBIDDEN_ORIGIN
        await self._sleep(min(args.bad_interval * index / max(1, args.bad_clients),
                              self._soak_end - self._now()))
        for _ in range(max(1, int(args.duration / args.bad_interval) + 1)):
            if self._now() >= self._soak_end:
                return
            attempt_started = self._now()
            factory = SessionFactory(url, self.totals, origin)
            try:
                client = await self._open(factory, source=args.bad_source)
            except Refused as refusal:
                self.totals.refusals["bad"][refusal.label] += 1
            else:
                self.totals.refusals["bad"]["accepted (should not be)"] += 1
                client.transport.abortConnection()
            await self._sleep(min(args.bad_interval - (self._now() - attempt_started),
                                  self._soak_end - self._now()))

    # -- sampling, probe, closing --------------------------------------------------------

    async def _sample(self) -> None:
        """Server RSS, CPU and /status every --sample-interval seconds of the soak."""
        args = self._args
        for _ in range(int(args.duration / args.sample_interval) + 2):
            now = self._now()
            status = await self._private.status()
            self._samples.append({
                "t": round(now - self._soak_start, 1),
                "rss_mib": self._server.memory_mib()["rss_mib"],
                "cpu_s": round(sum(self._server.cpu_times()), 2),
                "open": status["connections"]["open"],
                "registered": sum(status["connections"]["registered"].values()),
                "delivered": status["messages"]["delivered"],
                "refused": sum(status["handshakes_refused"].values()),
                "accept_queue": (listen_queue(self._server.port) or (None,))[0],
                "client_lag_max_ms": round(max(self._lags[-int(args.sample_interval / LAG_INTERVAL):],
                                               default=0.0) * 1000, 1),
            })
            if now >= self._soak_end:
                return
            await self._sleep(min(args.sample_interval, self._soak_end - now))

    async def _capacity_probe(self) -> dict:
        """Fill the per-IP room left next to the stable clients, then expect one 503."""
        args = self._args
        room = min(args.per_ip_cap, args.max_connections) - args.clients
        if room > args.probe_max:
            return {"skipped": f"{room} connections of room exceeds --probe-max {args.probe_max}"}
        probes, outcomes = [], Counter()

        async def probe(index: int) -> None:
            factory = SessionFactory(self._url(f"probe-{index}", {"1": "r"}), self.totals, ALLOWED_ORIGIN)
            try:
                probes.append((await self._open(factory), factory))
                outcomes["opened"] += 1
            except Refused as refusal:
                outcomes[refusal.label] += 1

        await defer.gatherResults([defer.Deferred.fromCoroutine(probe(i)) for i in range(room)])
        in_room = Counter(outcomes)
        await probe(room)
        one_more = next(iter(outcomes - in_room), "none")
        for client, _ in probes:
            client.sendClose(1000)
        await defer.DeferredList([factory.closed for _, factory in probes])
        refused = {label: n for label, n in in_room.items() if label != "opened"}
        return {"room": room, "opened": in_room["opened"], "refused_in_room": refused,
                "one_more": one_more, "ok": in_room["opened"] == room and one_more == "503"}

    async def _close_stable(self) -> None:
        for client in self._stable:
            if client.state == client.STATE_OPEN:
                client.sendClose(1000)
        closing = defer.DeferredList([client.is_closed for client in self._stable])
        try:
            await closing.addTimeout(CLOSE_TIMEOUT, self._reactor)
        except defer.TimeoutError:
            for client in self._stable:
                if client.transport is not None:
                    client.transport.abortConnection()

    # -- the result --------------------------------------------------------------------

    def _stable_losses(self) -> tuple:
        """(lost, received for failed publishes, received for never-sent slots) over stable clients."""
        workspaces = self._args.workspaces
        lost = late = phantom = 0
        for client in self._stable:
            factory = client.factory
            counts = factory.counts
            for slot in range(self.totals.slots):
                sequence = slot * workspaces + factory.workspace
                outcome = self._outcome[sequence] if sequence < self._max_messages else 0
                if outcome == 2 and not counts[slot]:
                    lost += 1
                elif outcome == 3 and counts[slot]:
                    late += 1
                elif outcome == 0 and counts[slot]:
                    phantom += 1
        return lost, late, phantom

    def _result(self, connect_seconds, soak_seconds, cpu, status_before, status_end, end_ok,
                probe, status_closed, closed_ok) -> dict:
        args, totals = self._args, self.totals
        wall, server_user, server_system, client_user, client_system, busy, steal = cpu
        server_cpu = server_user + server_system
        client_cpu = client_user + client_system
        ordered = sorted(totals.latencies)
        lags = sorted(self._lags)
        lost, late, phantom = self._stable_losses()
        expected = self._expected_stable()
        accepted = self._outcome.count(2)

        def refused_since(before: dict, after: dict) -> dict:
            return {code: count - before.get(code, 0) for code, count in after.items()
                    if count - before.get(code, 0)}

        client_utilization = client_cpu / wall
        slow_closes = sum(n for reason, n in totals.stable_closed_early.items() if reason.startswith("1008"))
        result = {
            "duration_seconds": round(soak_seconds, 1),
            "clients": {"stable": args.clients, "churners": args.churners, "bad": args.bad_clients,
                        "workspaces": args.workspaces},
            "settings": {"rate": args.rate, "payload": args.payload, "stay": [args.min_stay, args.max_stay],
                         "max_gap": args.max_gap, "per_ip_cap": args.per_ip_cap,
                         "max_connections": args.max_connections,
                         "max_auth_failures": args.max_auth_failures, "seed": args.seed},
            "connect_seconds": round(connect_seconds, 2),
            "churn": dict(sorted(totals.churn.items())),
            "messages": {"published": accepted, "sent": self._sent - self._skipped,
                         "publish_errors": dict(self._publish_errors),
                         "skipped_over_in_flight": self._skipped,
                         "rate_achieved": round(accepted / args.duration, 1)},
            "stable_deliveries": {"expected": expected, "received": totals.stable_received,
                                  "lost": lost, "duplicated": totals.stable_duplicated,
                                  "misrouted": totals.stable_misrouted + phantom,
                                  "received_for_failed_publish": late,
                                  "closed_early": dict(totals.stable_closed_early)},
            "latency_ms": distribution(ordered, 1e6),
            "deliveries_later_than_1s": len(ordered) - bisect.bisect_right(ordered, 10 ** 9),
            "publish_round_trip_ms": distribution(sorted(totals.publish_round_trips), 1e6),
            "churner_tcp_connect_ms": distribution(sorted(totals.connect_times), 1e-3),
            "churner_handshake_ms": distribution(sorted(totals.open_times), 1e-3),
            "server": {
                "rss_mib": self.memory,
                "cpu_seconds_soak": round(server_cpu, 2),
                "cpu_utilization_soak": round(server_cpu / wall, 3),
                "system_share": round(server_system / server_cpu, 3) if server_cpu else None,
                "cpu_seconds_total": round(sum(self._server.cpu_times()), 2),
                "messages": status_end["messages"],
            },
            "refusals": {
                "server_handshakes_refused_soak": refused_since(status_before["handshakes_refused"],
                                                                status_end["handshakes_refused"]),
                "client_observed": {side: dict(counts) for side, counts in totals.refusals.items()},
            },
            "slow_consumer_closes": {"server": status_end["slow_consumers"],
                                     "stable_clients_saw_1008": slow_closes},
            "end_state": {"open": status_end["connections"]["open"],
                          "registered_total": sum(status_end["connections"]["registered"].values()),
                          "matches_stable_clients": end_ok,
                          "all_closed_afterwards": closed_ok,
                          "open_after_close": status_closed["connections"]["open"]},
            "capacity_probe": probe,
            "client": {"cpu_seconds_soak": round(client_cpu, 2),
                       "cpu_utilization_soak": round(client_utilization, 3),
                       "reactor_lag_ms": {"p99": round(percentile(lags, 0.99) * 1000, 1) if lags else None,
                                          "max": round(lags[-1] * 1000, 1) if lags else None},
                       "gc_pauses_soak": self._gc.summary(),
                       "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
            "machine": {"other_busy_seconds_soak": round(max(0.0, busy - server_cpu - client_cpu), 2),
                        "steal_seconds_soak": round(steal, 2),
                        "listen_queue_turned_away_soak": dict(self._listen_turned_away)},
            "server_listen_backlog": self._listen_queue[1] if self._listen_queue else None,
            "timeline": self._samples,
        }
        if client_utilization >= SATURATED:
            result["notes"] = ["the load generator was CPU-bound during the soak: reduce the counts"]
        return result

    def partial(self, reason: str) -> dict:
        """What is known when the run failed or hit the deadline."""
        return {"error": reason, "phase": self.phase,
                "clients": {"stable": self._args.clients, "churners": self._args.churners},
                "churn": dict(self.totals.churn), "messages_sent": self._sent,
                "stable_received": self.totals.stable_received,
                "stable_closed_early": dict(self.totals.stable_closed_early),
                "client_observed_refusals": {side: dict(c) for side, c in self.totals.refusals.items()},
                "server_rss_mib": self.memory, "timeline": self._samples}


def distribution(ordered, unit: float) -> dict:
    """p50 / p90 / p99 / p99.9 / max of an ascending sequence, divided by `unit`."""
    if not ordered:
        return {}
    figures = {f"p{str(fraction * 100).rstrip('0').rstrip('.')}": percentile(ordered, fraction)
               for fraction in (0.5, 0.9, 0.99, 0.999)}
    figures["max"] = ordered[-1]
    return {name: round(value / unit, 2) for name, value in figures.items()}


def checks(result: dict) -> dict:
    """The conditions a passing run meets; empty when the run failed outright."""
    if "error" in result:
        return {}
    stable = result["stable_deliveries"]
    return {
        "no_lost_deliveries": stable["lost"] == 0,
        "no_duplicates": stable["duplicated"] == 0 and result["churn"].get("duplicated", 0) == 0,
        "no_misrouted": stable["misrouted"] == 0 and result["churn"].get("misrouted", 0) == 0,
        "stable_clients_stayed": not stable["closed_early"],
        "churners_not_closed_by_server": result["churn"].get("closed_by_server", 0) == 0,
        "no_publish_errors": not result["messages"]["publish_errors"],
        "no_server_errors": result["server_log"]["errors"] == 0,
        "end_state_consistent": result["end_state"]["matches_stable_clients"]
        and result["end_state"]["all_closed_afterwards"],
        "capacity_probe": result["capacity_probe"].get("ok", True),
        "no_bad_client_accepted": "accepted (should not be)" not in
        result["refusals"]["client_observed"]["bad"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    open_files = raise_open_file_limit()
    needed = max(args.per_ip_cap, args.clients + args.churners) + args.bad_clients + CONNECTION_MARGIN
    if open_files < needed:
        sys.exit(f"open-file limit {open_files} is too low for {needed} connections")
    settings = {
        "PYDIO_WS_PUBLIC_ALLOWED_ORIGINS": ALLOWED_ORIGIN,
        "PYDIO_WS_LIMITS_MAX_CONNECTIONS": str(args.max_connections),
        "PYDIO_WS_LIMITS_MAX_CONNECTIONS_PER_IP": str(args.per_ip_cap),
    }
    if args.max_auth_failures:
        settings["PYDIO_WS_LIMITS_MAX_AUTH_FAILURES"] = str(args.max_auth_failures)
    result = run_with_server(Soak, args, settings, log_summary, open_files, "pydio-ws-soak-")
    result["checks"] = checks(result)
    result["passed"] = bool(result["checks"]) and all(result["checks"].values())
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
