"""A real redis-server for tests, on 127.0.0.1 and a free port, in a temporary directory.

`start_redis(testcase)` skips the test when redis-server is not installed (CI installs the
Debian package), starts a server with no persistence (`--save '' --appendonly no`) and
stops it by PID on cleanup. `RedisServer.stop()` / `.start()` take it down and bring it
back on the same port, for fault tests. The server's output is kept in `log_path`.
"""

import shutil
import socket
import subprocess
import time
from typing import Optional, Sequence

from twisted.trial.unittest import SkipTest

from tests.support import temp_dir

STARTUP_SECONDS = 10.0


def redis_server_path() -> Optional[str]:
    return shutil.which("redis-server")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One redis-server process; `start()` and `stop()` may be repeated."""

    def __init__(self, directory: str, port: int, extra_args: Sequence[str] = (), tls: bool = False):
        self.directory = directory
        self.port = port
        self.tls = tls
        self.log_path = f"{directory}/redis.log"
        self._extra_args = tuple(extra_args)
        self._process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None

    def start(self) -> None:
        """Start the server and return once it accepts connections."""
        port_args = (["--port", "0", "--tls-port", str(self.port)] if self.tls
                     else ["--port", str(self.port)])
        command = [redis_server_path(), *port_args, "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", self.directory, "--daemonize", "no",
                   "--logfile", "", *self._extra_args]
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(command, cwd=self.directory, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self._accepts_connections():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: "
                                   f"{self.log_tail()}")
            time.sleep(0.01)  # bounded polling for the port to open

    def stop(self) -> None:
        """Stop the server (SIGTERM to its PID, SIGKILL if it lingers) and reap it."""
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STARTUP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as log:
                return " | ".join(log.read().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _accepts_connections(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False


def require_redis_server() -> None:
    """Skip the calling test when redis-server is not installed."""
    if redis_server_path() is None:
        raise SkipTest("redis-server is not installed (apt-get install redis-server; CI does)")


def start_redis(testcase, *extra_args: str, start: bool = True, tls: bool = False) -> RedisServer:
    """A redis-server for `testcase`, stopped on cleanup; `start=False` only picks its port."""
    require_redis_server()
    server = RedisServer(temp_dir(testcase), free_port(), extra_args, tls=tls)
    testcase.addCleanup(server.stop)
    if start:
        server.start()
    return server
