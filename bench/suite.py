"""Benchmark suite: pydio-ws side by side with a plain Node `ws` server, scenario by scenario.

Usage (from the repository root, with the project's virtualenv):

    npm ci --prefix bench                  # once; the suite runs it itself when needed
    .venv/bin/python bench/suite.py --all  # every scenario, 3 runs each, plot in docs/
    .venv/bin/python bench/suite.py --scenario fanout --scenario idle --runs 5
    .venv/bin/python bench/suite.py --scenario fanout --profile     # + one py-spy run
    .venv/bin/python bench/suite.py --all --runs 5 --profile --profile-native  # as recorded
    .venv/bin/python bench/suite.py --plot-from bench/results/<stamp>/summary.jsonl

Contenders:

- pydio-ws: `twistd -n pydio-ws`, one shared listener on a free 127.0.0.1 port, its private
  key and raised connection caps in its environment only.
- peer: `node bench/peer.js`, the baseline most users would measure us against (one
  process, `ws` with its default options; see that file).

Each run starts a fresh server pinned to CPU 0 (`taskset -c 0`) and the load generator,
`node bench/loadgen.js`, pinned to CPU 1, and stops both by PID whatever happens. The
contenders alternate (A B A B ...), `--runs` runs each. The load generator connects the
clients, waits until the server counts every registration, then (publish scenarios)
publishes and measures every delivery; this script reads the server's CPU time
(/proc/<pid>/stat) and memory (/proc/<pid>/status) around it.

Before each run the suite waits for a quiet machine (`--quiet`: other processes below
0.15 CPU); a run during which others used more is marked "disturbed", retried
(`--retries`) and left out of the medians. The servers run a copy of pydio_ws/ and
twisted/ taken when the suite starts, so edits to the tree cannot change the code under
test half-way.

Scenarios (the issue's numbering):

1. fanout: 1,000 clients on one workspace, 2,000 messages of 128 B, 16 in flight.
2. spread: 5,000 clients over 50 workspaces, 5,000 messages, 16 in flight.
3. steady: 1,000 clients on one workspace, 40 messages/s open loop for 20 s.
4. idle: 10,000 connections (registered over 50 workspaces): server RSS per connection,
   (RSS once all are registered - RSS before the first) / N, and connections per second.
5. scale-out: scenario 2 on one pydio-ws process (memory broker) vs one process on Redis
   vs 2 nodes joined by Redis vs one node with `[server] workers = 2` (Redis); run only
   when the Redis broker and workers are present (a redis-server is started on a free
   port). On a 2-core machine nothing is pinned in this scenario, so the load generator
   shares the cores.

Output: one JSON line per scenario on stdout with the medians of each contender, the
ratios pydio-ws / peer (for scale-out: each layout / one process) and the targets of the
issue, met or not. Every run's full record goes to bench/results/<stamp>/runs.jsonl, the
summary lines to summary.jsonl there, and the plot of the ratios to
docs/benchmarks-ratios.png (needs matplotlib; skipped with a message otherwise).
Exit status: 0 when every run lost nothing and nothing failed, 1 otherwise.

Only 127.0.0.1 is ever listened on or connected to.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import queue
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from _common import (CONNECTION_MARGIN, HOST, REPO_ROOT, STARTUP_TIMEOUT, STATUS_PATH, STOP_TIMEOUT,
                     code_version, connection_caps, free_port, machine_cpu_times, proc_cpu_times,
                     proc_memory_kib, raise_open_file_limit, server_environment, tcp_ext_counters,
                     twistd_command)

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_PLOT = REPO_ROOT / "docs" / "benchmarks-ratios.png"
SERVER_CPUS = "0"
LOADGEN_CPUS = "1"
ALL_CPUS = ",".join(str(cpu) for cpu in sorted(os.sched_getaffinity(0)))
EXIT_MARGIN = 30.0
IDLE_SETTLE = 1.0
QUIET_SAMPLE = 2.0
NOTABLE_LOG_LINES = 5
_NOTABLE = re.compile(r"#(warn|error|critical)\]|Traceback|Unhandled|Error")
MATPLOTLIB_HINT = ("matplotlib is not installed: `.venv/bin/pip install -e '.[bench]' "
                   "--config-settings editable_mode=compat`")


@dataclass(frozen=True)
class Contender:
    """One server layout under test."""

    name: str
    kind: str  # "pydio-ws" or "peer"
    nodes: int = 1
    workers: int = 1
    broker: str = "memory"


@dataclass(frozen=True)
class Target:
    """A goal from the issue: `subject`'s `metric` compared with `value` (`op` is >= or <=)."""

    label: str
    subject: str  # "ratio" or a contender name
    metric: str
    op: str
    value: float

    def check(self, summary: dict):
        measured = summary.get(self.subject, {}).get(self.metric)
        if measured is None:
            return {"target": self.label, "value": None, "met": None}
        met = measured >= self.value if self.op == ">=" else measured <= self.value
        return {"target": self.label, "value": measured, "met": met}


PYDIO = Contender("pydio_ws", "pydio-ws")
PEER = Contender("peer", "peer")


@dataclass(frozen=True)
class Scenario:
    """Load generator arguments, contenders (the first is compared with `baseline`) and targets."""

    name: str
    number: int
    clients: int
    loadgen: tuple
    mode: str = "publish"
    contenders: tuple = (PYDIO, PEER)
    baseline: str = "peer"
    targets: tuple = ()
    pinned: bool = True
    barrier: str = "status"
    deadline: float = 300.0
    needs: tuple = field(default=())

    def loadgen_args(self, scale: float) -> list:
        """The load generator's options, with client and message counts scaled for smoke tests."""
        scaled = []
        options = iter(self.loadgen)
        for name, value in zip(options, options):
            if name in ("--clients", "--messages") and scale != 1:
                value = max(1, round(value * scale))
            scaled += [name, str(value)]
        return scaled + ["--mode", self.mode, "--barrier", self.barrier]


SCENARIOS = (
    Scenario("fanout", 1, 1000, ("--clients", 1000, "--workspaces", 1, "--messages", 2000,
                                 "--payload", 128, "--in-flight", 16),
             targets=(Target("deliveries/s >= 2.0x peer", "ratio", "deliveries_per_s", ">=", 2.0),)),
    Scenario("spread", 2, 5000, ("--clients", 5000, "--workspaces", 50, "--messages", 5000,
                                 "--payload", 128, "--in-flight", 16),
             targets=(Target("deliveries/s >= 0.9x peer", "ratio", "deliveries_per_s", ">=", 0.9),)),
    Scenario("steady", 3, 1000, ("--clients", 1000, "--workspaces", 1, "--messages", 800,
                                 "--payload", 128, "--rate", 40),
             targets=(Target("p99 latency <= 1.2x peer", "ratio", "latency_p99_ms", "<=", 1.2),)),
    Scenario("idle", 4, 10000, ("--clients", 10000, "--workspaces", 50,
                                "--connect-concurrency", 200), mode="idle",
             targets=(Target("RSS per connection <= 12 KiB", "pydio_ws", "rss_per_connection_kib", "<=", 12.0),
                      Target("connections/s >= 2500", "pydio_ws", "connections_per_s", ">=", 2500.0))),
    Scenario("scale-out", 5, 5000, ("--clients", 5000, "--workspaces", 50, "--messages", 5000,
                                    "--payload", 128, "--in-flight", 16),
             contenders=(Contender("one_process", "pydio-ws"),
                         Contender("one_process_redis", "pydio-ws", broker="redis"),
                         Contender("nodes_2_redis", "pydio-ws", nodes=2, broker="redis"),
                         Contender("workers_2_redis", "pydio-ws", workers=2, broker="redis")),
             baseline="one_process", pinned=False, barrier="probe", needs=("redis", "workers")),
)
SCENARIO_NAMES = tuple(scenario.name for scenario in SCENARIOS)

# The metrics summarised per contender (median over runs, "lost" and "failed_runs" summed).
PUBLISH_METRICS = ("deliveries_per_s", "publishes_per_s", "latency_p50_ms", "latency_p99_ms",
                   "latency_max_ms", "lost", "cpu_s", "server_utilization", "deliveries_per_cpu_s",
                   "rss_mib", "loadgen_utilization", "other_busy_s", "interrupt_s", "connections_per_s",
                   "listen_overflows")
IDLE_METRICS = ("connections_per_s", "rss_per_connection_kib", "rss_before_mib", "rss_mib",
                "cpu_s", "cpu_ms_per_connection", "server_utilization", "loadgen_utilization",
                "other_busy_s", "interrupt_s", "listen_overflows", "lost")
SUMMED = ("lost",)


# ---------------------------------------------------------------- processes and /proc

def descendants(pid: int) -> list:
    """`pid` and every process below it, from /proc/<pid>/task/*/children."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as stream:
                    pending += [int(child) for child in stream.read().split()]
    return found


def cpu_seconds(pids) -> float:
    """User + system CPU seconds of these processes (those still alive)."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += sum(proc_cpu_times(pid))
    return total


def memory_kib(pids) -> dict:
    """Summed VmRSS and VmHWM (peak) of these processes, in KiB."""
    totals = {"VmRSS": 0, "VmHWM": 0}
    for pid in pids:
        with contextlib.suppress(OSError):
            for name, kib in proc_memory_kib(pid).items():
                totals[name] += kib
    return totals


def machine_busy_cores(seconds: float) -> float:
    """CPUs' worth of busy time (all but idle, iowait and steal) over the next `seconds`."""
    before, started = machine_cpu_times()[0], time.monotonic()
    time.sleep(seconds)
    return (machine_cpu_times()[0] - before) / (time.monotonic() - started)


def wait_quiet(threshold: float, patience: float) -> dict:
    """Wait (at most `patience` s) until the machine is quiet: less than `threshold` CPUs busy."""
    started = time.monotonic()
    while True:
        busy = machine_busy_cores(QUIET_SAMPLE)
        waited = time.monotonic() - started
        if busy < threshold or waited >= patience:
            return {"busy_cores": round(busy, 3), "waited_s": round(waited, 1), "quiet": busy < threshold}


def listen_overflows() -> int:
    """The machine's TcpExt ListenOverflows counter: SYNs dropped because an accept queue was full."""
    with contextlib.suppress(OSError, ValueError, IndexError, KeyError):
        return tcp_ext_counters()["ListenOverflows"]
    return 0


def pinned(command: list, cpus) -> list:
    """`command` under `taskset -c cpus` (taskset execs it, so the PID stays the command's)."""
    if cpus is None or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", cpus] + command


class ManagedProcess:
    """A child process in a session of its own, stopped by PID (SIGTERM, then SIGKILL) on exit,
    together with any process it started that outlives it."""

    def __init__(self, name: str, command: list, env: dict, log_path: Path, stdin=subprocess.DEVNULL,
                 stdout=None, cwd=None):
        self.name = name
        self.command = command
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            command, env=env, cwd=cwd or str(REPO_ROOT), stdin=stdin,
            stdout=stdout if stdout is not None else self._log, stderr=self._log,
            start_new_session=True, preexec_fn=raise_open_file_limit)
        self._family = [self.process.pid]

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list:
        """The process and its live descendants (remembered for the final clean-up)."""
        family = descendants(self.pid) if self.process.poll() is None else []
        self._family = sorted(set(self._family) | set(family))
        return family

    def stop(self, signum=signal.SIGTERM) -> None:
        self.pids()
        if self.process.poll() is None:
            self.process.send_signal(signum)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        for pid in self._family:
            if pid != self.pid and _alive_child_of_ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()
        return False


def _alive_child_of_ours(pid: int) -> bool:
    """Whether `pid` still runs and is not a zombie (it was recorded as a descendant of ours)."""
    try:
        with open(f"/proc/{pid}/stat") as stream:
            return stream.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def http_get_json(port: int, path: str, timeout: float) -> dict:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as response:
        return json.loads(response.read())


def wait_ready(server: ManagedProcess, port: int, deadline: float) -> None:
    """Poll GET /private/status until it answers; fail fast if the server exits."""
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with status {server.process.returncode} "
                               f"at start-up; see {server.log_path}: {log_tail(server.log_path)}")
        try:
            http_get_json(port, STATUS_PATH, timeout=1.0)
            return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} not answering on port {port} after {STARTUP_TIMEOUT} s")
        time.sleep(0.1)


def log_tail(path: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])[-600:]
    return ""


def log_summary(paths) -> dict:
    """Line count of the servers' output and its first warning/error lines."""
    count, notable, first = 0, 0, []
    for path in paths:
        with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                count += 1
                if _NOTABLE.search(line):
                    notable += 1
                    if len(first) < NOTABLE_LOG_LINES:
                        first.append(line.rstrip()[:300])
    return {"lines": count, "warnings_and_errors": notable, "first_notable": first}


# ---------------------------------------------------------------- servers

class Servers:
    """The server processes of one contender for one run (plus redis-server if it needs one)."""

    def __init__(self, contender: Contender, key: str, workdir: Path, max_connections: int, cpus,
                 code_root: Path = REPO_ROOT, extra_env=None):
        self.contender = contender
        self._code_root = code_root
        self._extra_env = dict(extra_env or {})
        self._key = key
        self._workdir = workdir
        self._max_connections = max_connections
        self._cpus = cpus
        self.ports = [free_port() for _ in range(contender.nodes)]
        self.processes = []
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        try:
            redis_url = self._start_redis() if self.contender.broker == "redis" else None
            for node, port in enumerate(self.ports):
                command, env = (self._pydio_command(port, node, redis_url)
                                if self.contender.kind == "pydio-ws" else self._peer_command(port))
                # In the run's directory, not the repository: a worker (`python -m
                # pydio_ws.worker`) puts its working directory first on sys.path, and would
                # import the live tree instead of the snapshot.
                self.processes.append(self._stack.enter_context(ManagedProcess(
                    f"{self.contender.name}[{node}]", pinned(command, self._cpus), env,
                    self._workdir / f"server-{node}.log", cwd=str(self._workdir))))
            deadline = time.monotonic() + STARTUP_TIMEOUT
            for process, port in zip(self.processes, self.ports):
                wait_ready(process, port, deadline)
            self._wait_workers(deadline)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc_info):
        self._stack.close()
        return False

    def _start_redis(self) -> str:
        port = free_port()
        redis = self._stack.enter_context(ManagedProcess(
            "redis-server", pinned([shutil.which("redis-server"), "--bind", HOST, "--port", str(port),
                                    "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
                                   self._cpus), dict(os.environ), self._workdir / "redis.log"))
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return f"redis://{HOST}:{port}/0"
            if redis.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {log_tail(redis.log_path)}")
            time.sleep(0.1)

    def _pydio_command(self, port: int, node: int, redis_url):
        env = server_environment(self._key, self._code_root, self._workdir / f"generated-{node}.key",
                                 connection_caps(self._max_connections))
        for name, value in self._extra_env.items():
            # Side experiments only (e.g. a sitecustomize directory): in front of the code.
            env[name] = f"{value}{os.pathsep}{env[name]}" if name == "PYTHONPATH" else value
        if redis_url:
            env["PYDIO_WS_BROKER_URL"] = redis_url
        if self.contender.workers > 1:
            env["PYDIO_WS_SERVER_WORKERS"] = str(self.contender.workers)
        return twistd_command(port), env

    def _peer_command(self, port: int):
        node = shutil.which("node")
        env = dict(os.environ, BENCH_KEY=self._key)
        return [node, str(BENCH_DIR / "peer.js"), "--host", HOST, "--port", str(port)], env

    def _wait_workers(self, deadline: float) -> None:
        """With workers, wait until process 0 has started them all."""
        if self.contender.workers == 1:
            return
        while len(self.pids()) < self.contender.workers * len(self.processes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(self.pids())} of {self.contender.workers} workers started")
            time.sleep(0.1)

    def pids(self) -> list:
        """Every server process (workers included; redis-server excluded)."""
        return [pid for process in self.processes for pid in process.pids()]

    def log_paths(self) -> list:
        return [process.log_path for process in self.processes]


class LoadGenerator(ManagedProcess):
    """`node bench/loadgen.js`, its stdout read line by line by a thread."""

    def __init__(self, arguments: list, key: str, workdir: Path, cpus):
        command = pinned([shutil.which("node"), str(BENCH_DIR / "loadgen.js"), *arguments], cpus)
        super().__init__("loadgen", command, dict(os.environ, BENCH_KEY=key), workdir / "loadgen.log",
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next_event(self, deadline: float) -> dict:
        """The next {"event": ...} line; RuntimeError if it exits or `deadline` passes first."""
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("load generator did not report in time") from None
            if line is None:
                self.process.wait(STOP_TIMEOUT)
                raise RuntimeError(f"load generator exited ({self.process.returncode}) early: "
                                   f"{log_tail(self.log_path)}")
            with contextlib.suppress(ValueError):
                document = json.loads(line)
                if isinstance(document, dict) and "event" in document:
                    return document

    def go(self) -> None:
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def stop(self, signum=signal.SIGTERM) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        super().stop(signum)


class Profiler(ManagedProcess):
    """`py-spy record` attached to the server; SIGINT makes it write its raw stacks."""

    def __init__(self, pid: int, output: Path, workdir: Path, cpus, native: bool = False):
        py_spy = Path(sys.executable).with_name("py-spy")
        # --native adds C frames (e.g. the garbage collector, socket calls) below Python's.
        command = pinned([str(py_spy), "record", "--pid", str(pid), "--rate", "250",
                          "--format", "raw", "--output", str(output)] + (["--native"] if native else []),
                         cpus)
        super().__init__("py-spy", command, dict(os.environ), workdir / "py-spy.log")
        self.output = output

    def finish(self) -> None:
        self.stop(signal.SIGINT)


# ---------------------------------------------------------------- one run

def run_once(scenario: Scenario, contender: Contender, args, workdir: Path, profile_to=None) -> dict:
    """One contender, one run: servers up, load generator through, everything stopped."""
    key = secrets.token_urlsafe(48)
    clients = max(1, round(scenario.clients * args.scale))
    # Unpinned still goes through taskset: this script itself runs on the load generator's CPU.
    server_cpus, loadgen_cpus = (SERVER_CPUS, LOADGEN_CPUS) if scenario.pinned and args.pin else (ALL_CPUS, ALL_CPUS)
    deadline = time.monotonic() + scenario.deadline + STARTUP_TIMEOUT + EXIT_MARGIN
    record = {"scenario": scenario.name, "contender": contender.name,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "pinning": {"server": server_cpus, "loadgen": loadgen_cpus}}
    with contextlib.ExitStack() as stack:
        servers = stack.enter_context(Servers(contender, key, workdir, clients + CONNECTION_MARGIN,
                                              server_cpus, args.code_root, args.server_env))
        pids = servers.pids()
        overflows_before = listen_overflows()
        rss_before = memory_kib(pids)["VmRSS"]
        cpu_before = cpu_seconds(pids)
        arguments = scenario.loadgen_args(args.scale) + [
            "--deadline", str(scenario.deadline), "--wait-go", "--clk-tck", str(os.sysconf("SC_CLK_TCK")),
            "--client", args.client]
        for port in servers.ports:
            arguments += ["--node", str(port)]
        for pid in pids:
            arguments += ["--server-pid", str(pid)]
        native = getattr(args, "profile_native", False)
        profiler = None
        if profile_to is not None and scenario.mode == "idle":
            # Idle: the connect phase is what is measured, so profile the opening handshakes.
            profiler = stack.enter_context(Profiler(pids[0], profile_to, workdir, loadgen_cpus, native))
            time.sleep(0.5)  # let py-spy attach before the first connection
        loadgen = stack.enter_context(LoadGenerator(arguments, key, workdir, loadgen_cpus))
        registered = loadgen.next_event(deadline)
        if registered["event"] == "registered":
            if profiler is not None:
                profiler.finish()
            if scenario.mode == "idle":
                time.sleep(IDLE_SETTLE)
                record["rss_registered_kib"] = memory_kib(pids)["VmRSS"]
            if profile_to is not None and scenario.mode == "publish":
                profiler = stack.enter_context(Profiler(pids[0], profile_to, workdir, loadgen_cpus, native))
                time.sleep(0.2)  # let py-spy attach before the first publish
            loadgen.go()
            result = loadgen.next_event(deadline)
            if profiler is not None:
                profiler.finish()
        else:
            result = registered
        memory = memory_kib(pids)
        gone = [pid for pid in pids if not os.path.exists(f"/proc/{pid}")]
        record.update({
            "loadgen": result,
            "server": {"pids": pids, "rss_before_kib": rss_before, "rss_kib": memory["VmRSS"],
                       "peak_rss_kib": memory["VmHWM"],
                       "cpu_total_s": round(cpu_seconds(pids) - cpu_before, 3)},
            # Machine-wide: other processes' sockets count too, but only ours connect here.
            "listen_overflows": listen_overflows() - overflows_before,
        })
        loadgen.process.wait(max(1.0, deadline - time.monotonic()))
        record["loadgen_exit"] = loadgen.process.returncode
    record["server"]["log"] = log_summary(servers.log_paths())
    record["server"]["exited_during_run"] = gone
    # A server process that died (e.g. a worker) fails the run: its share went unmeasured.
    record["ok"] = bool(result.get("ok")) and record["loadgen_exit"] == 0 and not gone
    return record


def disturbance(record: dict, mode: str):
    """CPUs' worth of other processes' work during the measured phase (None if unknown)."""
    result = record.get("loadgen") or {}
    phase = (result.get("publish_cpu") if mode == "publish" else result.get("connect_cpu")) or {}
    other = (phase.get("machine") or {}).get("other_busy_seconds")
    wall = phase.get("wall_seconds")
    return round(other / wall, 3) if other is not None and wall else None


def failed_record(scenario: Scenario, contender: Contender, error: BaseException) -> dict:
    return {"scenario": scenario.name, "contender": contender.name, "ok": False,
            "error": f"{type(error).__name__}: {error}"}


def run_metrics(record: dict, mode: str) -> dict:
    """The flat metrics of one run (missing ones are left out)."""
    result = record.get("loadgen") or {}
    server = record.get("server") or {}
    phase = result.get("publish_cpu") if mode == "publish" else result.get("connect_cpu")
    phase = phase or {}
    side = lambda name, key: (phase.get(name) or {}).get(key)  # noqa: E731
    metrics = {
        "cpu_s": side("server", "cpu_seconds"),
        "server_utilization": side("server", "utilization"),
        "loadgen_utilization": side("loadgen", "utilization"),
        "other_busy_s": (phase.get("machine") or {}).get("other_busy_seconds"),
        "interrupt_s": (phase.get("machine") or {}).get("interrupt_seconds"),
        "connections_per_s": result.get("connections_per_second"),
        "rss_mib": round(server["rss_kib"] / 1024, 1) if server.get("rss_kib") else None,
        "listen_overflows": record.get("listen_overflows"),
    }
    if mode == "publish":
        latency = result.get("latency_ms") or {}
        metrics.update({
            "deliveries_per_s": result.get("deliveries_per_second"),
            "publishes_per_s": result.get("publishes_per_second"),
            "latency_p50_ms": latency.get("p50"), "latency_p99_ms": latency.get("p99"),
            "latency_max_ms": latency.get("max"),
            "lost": result.get("lost_deliveries"),
            "deliveries_per_cpu_s": side("server", "work_per_cpu_second"),
        })
    else:
        clients = result.get("clients")
        registered = record.get("rss_registered_kib")
        before = server.get("rss_before_kib")
        metrics.update({
            "rss_before_mib": round(before / 1024, 1) if before else None,
            "rss_mib": round(registered / 1024, 1) if registered else metrics["rss_mib"],
            "rss_per_connection_kib": round((registered - before) / clients, 2)
            if registered and before and clients else None,
            "cpu_ms_per_connection": round(1000 * metrics["cpu_s"] / clients, 3)
            if metrics["cpu_s"] is not None and clients else None,
            "lost": result.get("clients_closed_early"),
        })
    return {name: value for name, value in metrics.items() if value is not None}


def summarise(scenario: Scenario, records: list, runs: int, environment: dict) -> dict:
    """The scenario's JSON line: medians per contender, ratios to the baseline, targets."""
    names = PUBLISH_METRICS if scenario.mode == "publish" else IDLE_METRICS
    summary = {"scenario": scenario.name, "number": scenario.number, "runs": runs,
               "order": " ".join(record["contender"] + ("(disturbed)" if record.get("disturbed") else "")
                                 for record in records)}
    for contender in scenario.contenders:
        every = [record for record in records if record["contender"] == contender.name]
        # Runs disturbed by other processes are kept in runs.jsonl but left out here.
        mine = [record for record in every if not record.get("disturbed")] or every
        good = [run_metrics(record, scenario.mode) for record in mine if "error" not in record]
        medians = {}
        for name in names:
            values = [metrics[name] for metrics in good if name in metrics]
            if values:
                medians[name] = sum(values) if name in SUMMED else round(statistics.median(values), 3)
        medians["runs_used"] = len(good)
        medians["disturbed_runs_left_out"] = len(every) - len(mine)
        medians["failed_runs"] = sum(1 for record in mine if not record.get("ok"))
        errors = [record["error"] for record in mine if "error" in record]
        if errors:
            medians["first_error"] = errors[0][:300]
        summary[contender.name] = medians
    baseline = summary[scenario.baseline]
    ratios = {}
    for contender in scenario.contenders:
        if contender.name == scenario.baseline:
            continue
        mine = summary[contender.name]
        pair = {name: round(mine[name] / baseline[name], 3) for name in names
                if name not in SUMMED and name in mine and baseline.get(name)}
        if len(scenario.contenders) == 2:
            ratios = pair
        else:
            ratios[contender.name] = pair
    summary["ratio"] = ratios
    summary["ratio_of"] = (f"{scenario.contenders[0].name} / {scenario.baseline}"
                           if len(scenario.contenders) == 2 else f"each / {scenario.baseline}")
    checks = [target.check(summary) for target in scenario.targets]
    for contender in scenario.contenders:
        lost = summary[contender.name].get("lost")
        checks.append({"target": f"{contender.name}: 0 lost", "value": lost,
                       "met": lost == 0 and summary[contender.name]["failed_runs"] == 0})
    summary["targets"] = checks
    summary["environment"] = environment
    return summary


# ---------------------------------------------------------------- profile

def summarise_profile(raw_path: Path, top: int = 25) -> dict:
    """Top self and inclusive costs from py-spy's raw (collapsed stack) output."""
    leaf_lines, self_functions, inclusive, total = {}, {}, {}, 0
    with open(raw_path, encoding="utf-8", errors="replace") as stream:
        for line in stream:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            count = int(count)
            total += count
            frames = stack.split(";")
            leaf = frames[-1]
            leaf_lines[leaf] = leaf_lines.get(leaf, 0) + count
            function = _function_of(leaf)
            self_functions[function] = self_functions.get(function, 0) + count
            for function in {_function_of(frame) for frame in frames}:
                inclusive[function] = inclusive.get(function, 0) + count

    def ranked(table, ceiling=100.0):
        rows = [{"frame": name, "samples": count, "percent": round(100 * count / total, 1)}
                for name, count in sorted(table.items(), key=lambda item: -item[1])]
        return [row for row in rows if row["percent"] <= ceiling][:top]

    # Inclusive costs leave out the frames under which nearly everything runs (twistd, the
    # reactor loop) to show the ones that tell something.
    return {"samples": total, "self_by_line": ranked(leaf_lines),
            "self_by_function": ranked(self_functions),
            "inclusive_by_function": ranked(inclusive, ceiling=INCLUSIVE_CEILING)}


INCLUSIVE_CEILING = 90.0


def _function_of(frame: str) -> str:
    """"name (path/file.py:123)" -> "name (path/file.py)"."""
    return re.sub(r":\d+\)$", ")", frame)


# ---------------------------------------------------------------- plot

RATIO_BARS = (  # scenario, metric, label, target ratio, higher is better
    ("fanout", "deliveries_per_s", "1 fanout\ndeliveries/s", 2.0, True),
    ("spread", "deliveries_per_s", "2 spread\ndeliveries/s", 0.9, True),
    ("steady", "latency_p99_ms", "3 steady\np99 latency", 1.2, False),
    ("idle", "connections_per_s", "4 idle\nconnections/s", None, True),
    ("idle", "rss_per_connection_kib", "4 idle\nRSS/connection", None, False),
)


def plot(summaries: list, path: Path) -> bool:
    """Bar chart of the ratios pydio-ws / peer, issue targets as markers; False if impossible."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(MATPLOTLIB_HINT, file=sys.stderr)
        return False
    by_name = {summary["scenario"]: summary for summary in summaries}
    bars = [bar for bar in RATIO_BARS if bar[1] in by_name.get(bar[0], {}).get("ratio", {})]
    idle = by_name.get("idle")
    scale = by_name.get("scale-out")
    panels = 1 + bool(idle) + bool(scale and scale.get("ratio"))
    figure, axes = plt.subplots(1, panels, figsize=(5 + 4 * panels, 5), squeeze=False,
                                gridspec_kw={"width_ratios": [2.2] + [1] * (panels - 1)})
    axes = list(axes[0])
    left = axes.pop(0)
    if bars:
        values = [by_name[s]["ratio"][m] for s, m, *_ in bars]
        colors = ["tab:green" if _meets(v, t, up) else ("tab:red" if t is not None else "tab:gray")
                  for v, (_, _, _, t, up) in zip(values, bars)]
        positions = range(len(bars))
        left.bar(positions, values, color=colors, width=0.6)
        for x, value in zip(positions, values):
            # Inside the bar's top, so a target marker just above it stays readable.
            inside = value > 0.45
            left.annotate(f"{value:.2f}x", (x, value), xytext=(0, -4 if inside else 2),
                          textcoords="offset points", ha="center", va="top" if inside else "bottom",
                          fontsize=9, color="white" if inside else "black", fontweight="bold")
        targets = [(x, t) for x, (_, _, _, t, _) in zip(positions, bars) if t is not None]
        if targets:
            left.scatter([x for x, _ in targets], [t for _, t in targets], marker="_", s=900,
                         linewidths=3, color="black", zorder=3, label="target (issue 6)")
        left.axhline(1.0, color="gray", linestyle=":", linewidth=1, label="parity with the ws peer")
        left.set_xlim(-0.6, max(len(bars), 3) - 0.4)
        left.set_xticks(list(positions))
        left.set_xticklabels([label + ("\n(higher better)" if up else "\n(lower better)")
                              for _, _, label, _, up in bars], fontsize=8)
        left.set_ylabel("pydio-ws / Node ws peer (median of runs)")
        left.legend(fontsize=8, loc="upper right")
    left.set_title("Ratios to the Node ws peer")
    if idle:
        axis = axes.pop(0)
        _idle_panel(axis, idle)
    if scale and scale.get("ratio"):
        axis = axes.pop(0)
        names = list(scale["ratio"])
        values = [scale["ratio"][name].get("deliveries_per_s", 0) for name in names]
        axis.bar(range(len(names)), values, color="tab:blue", width=0.6)
        for x, value in enumerate(values):
            axis.annotate(f"{value:.2f}x", (x, value), ha="center", va="bottom", fontsize=9)
        axis.axhline(1.0, color="gray", linestyle=":", linewidth=1)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels([name.replace("_", " ") for name in names], fontsize=8)
        axis.set_title("5 scale-out (unpinned): deliveries/s\nvs 1 process, memory broker", fontsize=10)
    environment = (summaries[0].get("environment") or {}) if summaries else {}
    figure.suptitle(f"pydio-ws benchmark suite ({environment.get('cpus', '?')} CPUs, "
                    f"code {environment.get('code', '?')}, {environment.get('date', '')})", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _idle_panel(axis, idle: dict) -> None:
    """Absolute idle figures of both contenders, with the issue's absolute targets."""
    metrics = (("rss_per_connection_kib", "RSS per connection (KiB)", 12.0),
               ("connections_per_s", "connections/s (/1000)", 2500.0))
    width = 0.35
    for offset, (name, color) in zip((-width / 2, width / 2), (("pydio_ws", "tab:blue"), ("peer", "tab:orange"))):
        values = []
        for metric, _, _ in metrics:
            value = idle.get(name, {}).get(metric, 0)
            values.append(value / 1000 if metric == "connections_per_s" else value)
        xs = [x + offset for x in range(len(metrics))]
        axis.bar(xs, values, width=width, color=color, label=name.replace("_", "-"))
        for x, value in zip(xs, values):
            axis.annotate(f"{value:.1f}", (x, value), ha="center", va="bottom", fontsize=8)
    axis.scatter(range(len(metrics)), [12.0, 2.5], marker="_", s=900, linewidths=3, color="black",
                 zorder=3, label="target: <= 12 KiB, >= 2.5k/s")
    axis.set_xticks(range(len(metrics)))
    axis.set_xticklabels([label for _, label, _ in metrics], fontsize=8)
    axis.set_title("4 idle: 10,000 connections")
    axis.legend(fontsize=8)


def _meets(value, target, higher_is_better) -> bool:
    if target is None:
        return False
    return value >= target if higher_is_better else value <= target


# ---------------------------------------------------------------- set-up and main

def snapshot_code(destination: Path) -> str:
    """Copy pydio_ws/ and twisted/ (the plugin) to `destination`; returns a digest of the copy.

    Every run of a suite serves this copy, so the code under test cannot change half-way
    through even while others edit the working tree.
    """
    digest = hashlib.sha256()
    for package in ("pydio_ws", "twisted"):
        shutil.copytree(REPO_ROOT / package, destination / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache"))
    for path in sorted(destination.rglob("*.py")):
        digest.update(str(path.relative_to(destination)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def environment() -> dict:
    def version(command):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
        return None

    model = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as stream:
        model = next((line.split(":", 1)[1].strip() for line in stream if line.startswith("model name")), None)
    ws_version = None
    with contextlib.suppress(OSError, ValueError):
        ws_version = json.loads((BENCH_DIR / "node_modules" / "ws" / "package.json").read_text())["version"]
    return {"code": code_version(), "date": datetime.date.today().isoformat(), "cpus": os.cpu_count(),
            "cpu_model": model, "kernel": platform.release(), "python": platform.python_version(),
            "node": version([shutil.which("node") or "node", "--version"]), "ws": ws_version,
            "open_file_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def ensure_node_modules() -> None:
    """Install bench/node_modules from the lock file (npm ci) when `ws` is missing."""
    if shutil.which("node") is None:
        sys.exit("node is not installed (the load generator and the peer need Node.js >= 18)")
    if (BENCH_DIR / "node_modules" / "ws" / "package.json").exists():
        return
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("bench/node_modules is missing and npm is not installed: run `npm ci --prefix bench`")
    print("installing the load generator's dependencies: npm ci --prefix bench", file=sys.stderr)
    subprocess.run([npm, "ci", "--prefix", str(BENCH_DIR), "--no-audit", "--no-fund"], check=True, timeout=300)


def unavailable(scenario: Scenario):
    """Why this scenario cannot run here, or None."""
    if "redis" in scenario.needs:
        if shutil.which("redis-server") is None:
            return "redis-server is not installed"
        if not (REPO_ROOT / "pydio_ws" / "redis_backend.py").exists():
            return "pydio_ws/redis_backend.py is missing (Redis broker not available)"
    if "workers" in scenario.needs:
        config = (REPO_ROOT / "pydio_ws" / "config.py").read_text()
        if '"workers"' not in config or not (REPO_ROOT / "pydio_ws" / "workers.py").exists():
            return "[server] workers is not available"
    return None


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="pydio-ws vs a Node ws peer, scenario by scenario (see docs/benchmarks.md).")
    parser.add_argument("--scenario", action="append", choices=SCENARIO_NAMES, default=[],
                        help="scenario to run (repeatable)")
    parser.add_argument("--all", action="store_true", help="every scenario (scale-out when available)")
    parser.add_argument("--runs", type=int, default=3, help="runs per contender (default 3)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="where a <stamp>/ directory with runs.jsonl and summary.jsonl goes")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG of the ratios")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    parser.add_argument("--plot-from", type=Path, metavar="SUMMARY_JSONL",
                        help="only draw the plot from a summary.jsonl written before")
    parser.add_argument("--profile", action="store_true",
                        help="after each scenario (but scale-out), one extra pydio-ws run under py-spy: "
                             "the publish phase, or for idle the connect phase")
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile: sample C frames too (py-spy --native)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply clients and messages (smoke tests only; default 1)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not use taskset")
    parser.add_argument("--quiet", type=float, default=0.15, metavar="CPUS",
                        help="before each run, wait until other processes use less than this many "
                             "CPUs; a run during which they used more is 'disturbed', retried and "
                             "left out of the medians (default 0.15; 0 disables)")
    parser.add_argument("--quiet-wait", type=float, default=600.0, metavar="SECONDS",
                        help="longest wait for a quiet machine before a run (default 600)")
    parser.add_argument("--client", choices=("lean", "ws"), default="lean",
                        help="the load generator's WebSocket client: lean (default) or the ws "
                             "package's, to cross-check")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the pydio-ws processes, for side experiments "
                             "(PYTHONPATH goes in front of the code's); recorded in the results")
    parser.add_argument("--retries", type=int, default=2,
                        help="extra attempts of a disturbed run (default 2)")
    args = parser.parse_args(argv)
    if args.plot_from is None and not args.scenario and not args.all:
        parser.error("choose --all, --scenario NAME or --plot-from FILE")
    if args.runs < 1 or args.scale <= 0:
        parser.error("--runs must be at least 1 and --scale positive")
    if not all("=" in item for item in args.server_env):
        parser.error("--server-env takes NAME=VALUE")
    args.server_env = dict(item.split("=", 1) for item in args.server_env)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_from is not None:
        summaries = [json.loads(line) for line in args.plot_from.read_text().splitlines() if line.strip()]
        return 0 if plot(summaries, args.plot) else 1
    ensure_node_modules()
    signal.signal(signal.SIGTERM, _interrupt)
    if args.pin and shutil.which("taskset") and len(ALL_CPUS.split(",")) > 1:
        # This script mostly waits; keep it off the server's core.
        os.sched_setaffinity(0, {int(LOADGEN_CPUS)})
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.results_dir / stamp
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pydio-ws-code-") as code_root:
        args.code_root = Path(code_root)
        env = environment()
        env["code_snapshot_sha256"] = snapshot_code(args.code_root)
        if args.server_env:
            env["server_env"] = args.server_env
        if args.scale != 1:
            env["scale"] = args.scale
        env["loadgen_client"] = args.client
        return _run_scenarios(args, out, env)


def _run_scenarios(args, out: Path, env: dict) -> int:
    """Every chosen scenario in turn; prints and writes the summaries, draws the plot."""
    summaries, all_ok = [], True
    for scenario in (s for s in SCENARIOS if args.all or s.name in args.scenario):
        reason = unavailable(scenario)
        if reason:
            line = {"scenario": scenario.name, "number": scenario.number, "skipped": reason}
            print(json.dumps(line), flush=True)
            with open(out / "summary.jsonl", "a") as stream:
                stream.write(json.dumps(line) + "\n")
            continue
        records = []
        for run in range(args.runs):
            for contender in scenario.contenders:
                for attempt in range(1 + args.retries):
                    print(f"[{scenario.name}] run {run + 1}/{args.runs}: {contender.name}"
                          + (f" (attempt {attempt + 1})" if attempt else ""), file=sys.stderr, flush=True)
                    record = _measured_run(scenario, contender, args)
                    record.update(run=run + 1, attempt=attempt + 1, code=env["code"])
                    with open(out / "runs.jsonl", "a") as stream:
                        stream.write(json.dumps(record) + "\n")
                    _report_run(record, scenario.mode)
                    if not record.get("disturbed"):
                        break
                records.append(record)
        summary = summarise(scenario, records, args.runs, env)
        if args.profile and scenario.pinned:
            summary["profile"] = _profile(scenario, args, out)
        summaries.append(summary)
        all_ok &= all(record.get("ok") for record in records)
        print(json.dumps(summary), flush=True)
        with open(out / "summary.jsonl", "a") as stream:
            stream.write(json.dumps(summary) + "\n")
    print(f"results in {out}", file=sys.stderr)
    if not args.no_plot and summaries:
        if plot(summaries, args.plot):
            print(f"plot in {args.plot}", file=sys.stderr)
    return 0 if all_ok else 1


def _interrupt(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so every `with` block stops its processes."""
    raise KeyboardInterrupt(f"signal {signum}")


def _measured_run(scenario, contender, args, profile_to=None) -> dict:
    """One run after waiting for a quiet machine; marked "disturbed" when others were busy."""
    before = wait_quiet(args.quiet, args.quiet_wait) if args.quiet > 0 else None
    record = _run_in_workdir(scenario, contender, args, profile_to)
    record["machine_before"] = before
    others = disturbance(record, scenario.mode)
    record["other_busy_cores"] = others
    record["disturbed"] = bool(args.quiet > 0 and others is not None and others >= args.quiet)
    return record


def _run_in_workdir(scenario, contender, args, profile_to=None) -> dict:
    with tempfile.TemporaryDirectory(prefix="pydio-ws-suite-") as workdir:
        try:
            return run_once(scenario, contender, args, Path(workdir), profile_to)
        except Exception as error:  # one failed run must not lose the others' results
            return failed_record(scenario, contender, error)


def _report_run(record: dict, mode: str) -> None:
    metrics = run_metrics(record, mode) if "error" not in record else {"error": record["error"]}
    shown = {name: metrics[name] for name in ("deliveries_per_s", "latency_p99_ms", "lost", "cpu_s",
                                               "connections_per_s", "rss_per_connection_kib", "error")
             if name in metrics}
    print(f"    ok={record.get('ok')} other_busy_cores={record.get('other_busy_cores')} "
          f"disturbed={record.get('disturbed')} {json.dumps(shown)}", file=sys.stderr, flush=True)


def _profile(scenario: Scenario, args, out: Path) -> dict:
    raw = out / f"profile-{scenario.name}.txt"
    print(f"[{scenario.name}] profile run: pydio_ws under py-spy", file=sys.stderr, flush=True)
    record = _measured_run(scenario, scenario.contenders[0], args, profile_to=raw)
    with open(out / "runs.jsonl", "a") as stream:
        stream.write(json.dumps(dict(record, profiled=True)) + "\n")
    if not raw.exists():
        return {"error": record.get("error", "py-spy wrote nothing")}
    top = summarise_profile(raw)
    (out / f"profile-{scenario.name}.top.json").write_text(json.dumps(top, indent=1) + "\n")
    return {"raw": str(raw), "samples": top["samples"],
            "top_self": top["self_by_function"][:8], "run_ok": record.get("ok"),
            "under_profiler": {name: value for name, value in run_metrics(record, scenario.mode).items()
                               if name in ("deliveries_per_s", "connections_per_s")}}


if __name__ == "__main__":
    sys.exit(main())
