"""Plumbing the benchmark scripts share: the server under test as a process, /proc readings,
and the load generator's side of a run (reactor, logging, HTTP to the server's private side).

`bench/fanout.py`, `bench/soak.py` and `bench/suite.py` import it as `_common`: they run as
`python bench/<script>.py`, which puts bench/ on sys.path. Only 127.0.0.1 is ever listened
on or connected to.
"""

import hashlib
import json
import math
import os
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
from pathlib import Path

from twisted.internet import defer, task
from twisted.internet.error import ConnectError, ReactorNotRunning
from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            globalLogBeginner, textFileLogObserver)
from twisted.web.client import Agent, HTTPConnectionPool, ResponseNeverReceived, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_CPU = 0
PUBLIC_PATH = "/public"
PRIVATE_PATH = "/private"
STATUS_PATH = f"{PRIVATE_PATH}/status"
STARTUP_TIMEOUT = 30.0
CONNECTION_MARGIN = 100  # connection caps are the clients a run needs plus this
STOP_TIMEOUT = 10.0
POLL_TIMEOUT = 1.0


# ---------------------------------------------------------------- set-up

def raise_open_file_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit and return it (children inherit it; the suite
    also runs this in each child before exec)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
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


# ---------------------------------------------------------------- the server under test

def twistd_command(port: int) -> list:
    """`twistd -n pydio-ws` with one shared listener on 127.0.0.1:`port`."""
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        raise RuntimeError(f"twistd not found next to {sys.executable}")
    return [str(twistd), "-n", "--pidfile=", "pydio-ws",
            "--public-host", HOST, "--public-port", str(port),
            "--private-host", HOST, "--private-port", str(port)]


def connection_caps(max_connections: int) -> dict:
    """Server settings that let `max_connections` clients in."""
    # Every client comes from 127.0.0.1: lift the per-address and total caps.
    return {"PYDIO_WS_LIMITS_MAX_CONNECTIONS": str(max_connections),
            "PYDIO_WS_LIMITS_MAX_CONNECTIONS_PER_IP": str(max_connections)}


def server_environment(key: str, code_root, key_file, settings: dict) -> dict:
    """This process's environment without its PYDIO_WS_* variables, plus the server's code
    path, its private key (never on the command line) and `settings`."""
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith("PYDIO_WS_")}
    environment.update({
        "PYTHONPATH": str(code_root),
        "PYDIO_WS_PRIVATE_KEY": key,
        "PYDIO_WS_PRIVATE_GENERATED_KEY_FILE": str(key_file),
        **settings,
    })
    return environment


class ServerProcess:
    """The server under test: a `twistd -n pydio-ws` subprocess, stopped by PID on exit."""

    def __init__(self, port: int, key: str, workdir: str, log_path: str, cpus, settings: dict):
        """`cpus`: the CPUs to pin it to, or None; `settings`: extra environment variables."""
        self.port = port
        self._key = key
        self._settings = settings
        self._workdir = workdir
        self.log_path = log_path
        self._cpus = cpus
        self._process = None
        self.pinning = "none"

    def __enter__(self):
        command = twistd_command(self.port)
        taskset = shutil.which("taskset")
        if self._cpus and taskset:
            # taskset execs twistd, so the PID we hold is the server's own.
            command = [taskset, "-c", ",".join(map(str, sorted(self._cpus)))] + command
            self.pinning = f"taskset -c {','.join(map(str, sorted(self._cpus)))}"
        environment = server_environment(self._key, REPO_ROOT,
                                         os.path.join(self._workdir, "generated.key"), self._settings)
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
        return proc_cpu_times(self.pid)

    def memory_mib(self) -> dict:
        """Current and peak resident set size of the server, in MiB."""
        kib = proc_memory_kib(self.pid)
        rss, peak = (round(kib[name] / 1024, 1) if name in kib else None for name in ("VmRSS", "VmHWM"))
        return {"rss_mib": rss, "peak_rss_mib": peak}

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


# ---------------------------------------------------------------- /proc readings

def proc_cpu_times(pid: int) -> tuple:
    """User and system CPU seconds process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as stream:
        fields = stream.read().rpartition(")")[2].split()
    # fields[0] is field 3 (state) of proc(5); utime and stime are fields 14 and 15.
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def proc_memory_kib(pid: int) -> dict:
    """VmRSS and VmHWM (peak RSS) of process `pid` in KiB, those of the two it reports."""
    values = {}
    with open(f"/proc/{pid}/status") as stream:
        for line in stream:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0])
    return values


def own_cpu_times() -> tuple:
    """User and system CPU seconds this process has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def machine_cpu_times() -> tuple:
    """Busy (everything but idle, iowait and steal) and steal CPU seconds of the whole machine."""
    with open("/proc/stat") as stream:
        fields = [int(value) for value in stream.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    ticks = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / ticks, steal / ticks


def tcp_ext_counters() -> dict:
    """The machine's TcpExt counters from /proc/net/netstat (ListenOverflows and others)."""
    with open("/proc/net/netstat") as stream:
        lines = [line.split() for line in stream if line.startswith("TcpExt:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def cpu_snapshot(server: ServerProcess) -> tuple:
    """CPU seconds so far: (wall clock, server user, server system, own user, own system,
    machine busy, machine steal)."""
    return (time.perf_counter(), *server.cpu_times(), *own_cpu_times(), *machine_cpu_times())


def cpu_since(server: ServerProcess, before: tuple) -> tuple:
    """The seconds of a cpu_snapshot spent since `before`."""
    return tuple(now - then for now, then in zip(cpu_snapshot(server), before))


# ---------------------------------------------------------------- the load generator's side

def workspace_of(index: int, workspaces: int) -> str:
    """The workspace of client `index`, or of message `index`."""
    return str(1 + index % workspaces)


def percentile(ordered, fraction: float):
    """Nearest-rank percentile of an ascending sequence."""
    return ordered[max(1, math.ceil(len(ordered) * fraction)) - 1]


def start_logging() -> None:
    """Warnings and errors of this process (e.g. unhandled Deferred failures) to stderr."""
    levels = LogLevelFilterPredicate(LogLevel.warn)
    # Autobahn warns once per refused handshake; the JSON line reports the refusals.
    levels.setLogLevelForNamespace("autobahn", LogLevel.error)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [levels])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    # readBody warns when a short response arrived whole before it was called (the
    # transport it then sees has no abortConnection); harmless here.
    warnings.filterwarnings("ignore", "Using readBody with a transport", DeprecationWarning)


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


class PrivateSide:
    """The server's private side over persistent HTTP connections: its status, publishing."""

    def __init__(self, reactor, port: int, key: str, connections: int, timeout: float):
        """`connections`: persistent connections kept at most; `timeout`: seconds a request may take."""
        self._reactor = reactor
        self._publish_url = f"http://{HOST}:{port}{PRIVATE_PATH}".encode("ascii")
        self._status_url = f"http://{HOST}:{port}{STATUS_PATH}".encode("ascii")
        self._key = key.encode("ascii")
        self._timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = connections
        self._agent = Agent(reactor, pool=self._pool)

    async def status(self, timeout: float = None) -> dict:
        """The server's GET /private/status document."""
        response = await self._agent.request(b"GET", self._status_url).addTimeout(
            self._timeout if timeout is None else timeout, self._reactor)
        body = await readBody(response)
        if response.code != 200:
            raise RuntimeError(f"GET {STATUS_PATH} answered {response.code}: {body[:200]!r}")
        return json.loads(body)

    async def wait_until_ready(self, server: ServerProcess, poll_interval: float) -> None:
        """Poll the status until the server answers; fails if it exits or STARTUP_TIMEOUT passes."""
        give_up = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if server.exited() is not None:
                raise RuntimeError(f"server exited with status {server.exited()} at start-up")
            try:
                await self.status(POLL_TIMEOUT)
                return
            except (ConnectError, ResponseNeverReceived, defer.TimeoutError):
                pass
            if time.monotonic() > give_up:
                raise RuntimeError(f"server not answering after {STARTUP_TIMEOUT} s")
            await task.deferLater(self._reactor, poll_interval, lambda: None)

    async def publish(self, workspace: str, content: str) -> tuple:
        """POST one message with this CONTENT to `workspace`; returns the answer's status code
        and body."""
        body = json.dumps({"REPO_ID": workspace, "CONTENT": content}).encode("utf-8")
        headers = Headers({b"X-Pydio-Key": [self._key], b"Content-Type": [b"application/json"]})
        response = await self._agent.request(
            b"POST", self._publish_url, headers, BytesProducer(body)
        ).addTimeout(self._timeout, self._reactor)
        return response.code, await readBody(response)

    async def close(self) -> None:
        """Close the persistent connections."""
        await self._pool.closeCachedConnections()


def run_in_reactor(make_bench, deadline: float) -> dict:
    """Run `make_bench(reactor).run()` under the global reactor, bounded by `deadline` seconds;
    when it fails or runs out of time, the bench's `partial(reason)` document instead."""
    # Imported here: importing the reactor installs it, which only a run should do.
    from twisted.internet import reactor

    bench = make_bench(reactor)
    exceeded = f"deadline of {deadline} s exceeded"
    deadline_hit = False
    outcome = None
    running = defer.Deferred.fromCoroutine(bench.run())

    def expire():
        nonlocal deadline_hit
        deadline_hit = True
        running.cancel()

    def stop():
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    expiry = reactor.callLater(deadline, expire)
    # Should cancellation ever not unwind (e.g. a soak's churners keep running), stop the
    # reactor anyway a little later.
    backstop = reactor.callLater(deadline + STOP_TIMEOUT, stop)

    def finished(result):
        nonlocal outcome
        if isinstance(result, dict):
            outcome = result
        elif deadline_hit:
            outcome = bench.partial(exceeded)
        else:
            outcome = bench.partial(f"{result.type.__name__}: {result.getErrorMessage()}")
        for call in (expiry, backstop):
            if call.active():
                call.cancel()
        reactor.callWhenRunning(stop)

    running.addBoth(finished)
    reactor.run()
    if outcome is not None:
        return outcome
    return bench.partial(exceeded if deadline_hit else "interrupted")


def run_with_server(bench_class, args, settings: dict, summarise_log, open_files: int,
                    workdir_prefix: str) -> dict:
    """One whole run against a fresh server; returns the result document to print.

    Starts the server with `settings` in its environment, pinned to SERVER_CPU and this
    process to the other CPUs when there are several; runs `bench_class(args, server, key,
    reactor)` under the reactor within `args.deadline`; stops the server. The result gets
    `server_log` (`summarise_log(path)`), `pinning`, `open_file_limit` and `code` added.
    """
    start_logging()
    available = os.sched_getaffinity(0)
    pinned = len(available) > 1 and SERVER_CPU in available
    key = secrets.token_urlsafe(48)
    version = code_version()
    with tempfile.TemporaryDirectory(prefix=workdir_prefix) as workdir:
        log_path = args.server_log or os.path.join(workdir, "server.log")
        server = ServerProcess(free_port(), key, workdir, log_path, {SERVER_CPU} if pinned else None,
                               settings)
        with server:
            if pinned:
                os.sched_setaffinity(0, available - {SERVER_CPU})
            result = run_in_reactor(lambda reactor: bench_class(args, server, key, reactor), args.deadline)
        result["server_log"] = summarise_log(log_path)
    result["pinning"] = {"server": server.pinning,
                         "client": sorted(os.sched_getaffinity(0)) if pinned else "none"}
    result["open_file_limit"] = open_files
    result["code"] = version
    return result
