"""Tests for pydio_ws.logs and the --log-format / --log-level options of twistd pydio-ws."""

import io
import json
import sys

from twisted.logger import Logger, LogLevel, LogPublisher, textFileLogObserver
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions
from twisted.trial import unittest

from pydio_ws.config import load_config
from pydio_ws.logs import PerSecondTime, stdout_observer, text_observer
from pydio_ws.workers import worker_spec


def captured(log_format: str, level: str, emit) -> str:
    """What `stdout_observer(log_format, level)` writes for the events `emit(logger)` logs."""
    buffer, original = io.StringIO(), sys.stdout
    sys.stdout = buffer
    try:
        publisher = LogPublisher(stdout_observer(log_format, level))
    finally:
        sys.stdout = original
    emit(Logger(observer=publisher))
    return buffer.getvalue()


class ObserverTests(unittest.TestCase):
    """The observers write their format and drop events below their level."""

    def test_json_observer_writes_one_object_per_line(self):
        """The JSON output parses as one object per line carrying the event fields."""
        output = captured("json", "info", lambda log: log.info(
            "browser {peer} connected as {user_id}", peer="127.0.0.1", user_id="alice"))
        record = json.loads(output.splitlines()[0])
        self.assertEqual((record["peer"], record["user_id"]), ("127.0.0.1", "alice"))

    def test_events_below_the_level_are_dropped(self):
        """At info, a debug event is not written and an info event is; at debug, both are."""
        def emit(log):
            log.debug("browser {peer} registered on {repo_id}", peer="p", repo_id="7")
            log.info("browser {peer} connected", peer="p")
        self.assertEqual(captured("text", "info", emit).count("\n"), 1)
        self.assertIn("connected", captured("text", "info", emit))
        self.assertEqual(captured("text", "debug", emit).count("\n"), 2)
        self.assertEqual(captured("json", "error", emit), "")


class OptionTests(unittest.TestCase):
    """How the options choose twistd's observer."""

    def test_foreground_gets_our_observer_for_format_and_level(self):
        """With -n, --log-format and --log-level pick the matching observer factory."""
        options = ServerOptions()
        options.parseOptions(["-n", "pydio-ws", "--log-format", "json", "--log-level", "debug"])
        self.assertEqual(options["logger"].__module__, "pydio_ws.logs")

    def test_logfile_keeps_twistds_observer_at_the_default_level(self):
        """With --logfile, twistd writes the file itself (unfiltered), as it would without us."""
        options = ServerOptions()
        options.parseOptions(["-n", "--logfile", "pydio-ws.log", "pydio-ws"])
        self.assertIsNone(options["logger"])

    def test_level_without_standard_output_is_a_usage_error(self):
        """A level other than info is refused where our observer cannot apply it."""
        with self.assertRaises(usage.UsageError) as caught:
            ServerOptions().parseOptions(["--logfile", "pydio-ws.log", "pydio-ws", "--log-level", "debug"])
        self.assertIn("-n", str(caught.exception))

    def test_bad_format_or_level_is_a_usage_error(self):
        """Anything but text/json, or debug/info/warn/error, is refused with the option's name."""
        for arguments, name in ((["--log-format", "xml"], "--log-format"),
                                (["--log-level", "verbose"], "--log-level")):
            with self.assertRaises(usage.UsageError) as caught:
                ServerOptions().parseOptions(["-n", "pydio-ws"] + arguments)
            self.assertIn(name, str(caught.exception))


class TextFormatTests(unittest.TestCase):
    """Our text lines are twistd's."""

    def test_text_line_matches_twistds_format(self):
        """Time stamp, [namespace#level] and message, as twistd's own text observer writes them."""
        event = {"log_format": "browser {peer} connected", "peer": "p", "log_level": LogLevel.info,
                 "log_namespace": "pydio_ws.public", "log_time": 1_700_000_000.75}
        ours, theirs = io.StringIO(), io.StringIO()
        text_observer(ours)(event)
        textFileLogObserver(theirs)(event)
        self.assertEqual(ours.getvalue(), theirs.getvalue())

    def test_time_stamp_follows_the_clock(self):
        """The stamp is reused within a second and changes with the next one."""
        format_time = PerSecondTime()
        self.assertEqual(format_time(100.1), format_time(100.9))
        self.assertNotEqual(format_time(100.9), format_time(101.0))
        self.assertEqual(format_time(None), "-")


class WorkerLogTests(unittest.TestCase):
    """Worker processes log as process 0 does."""

    def test_worker_spec_carries_format_and_level(self):
        """The instructions of a worker name process 0's log format and level."""
        config = load_config(None, environ={}, overrides={("private", "key"): "k" * 32})
        spec = json.loads(worker_spec(config, 1, {"public": 8090, "private": 8090}, ("json", "debug")))
        self.assertEqual(spec["log"], ["json", "debug"])
