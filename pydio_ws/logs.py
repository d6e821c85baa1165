"""Log output for twistd: format (text or JSON lines) and lowest level, on standard output.

twistd takes its observer factory by dotted name (`--logger`), so every combination of
`--log-format` and `--log-level` has its factory in `observers`, e.g.
`pydio_ws.logs.observers.json_info`. Events below the level are dropped before they are
formatted: registrations are debug events, one per workspace switch of every browser.
"""

import sys
from types import SimpleNamespace

from twisted.logger import (FileLogObserver, FilteringLogObserver, LogLevel,
                            LogLevelFilterPredicate, formatEventAsClassicLogText, formatTime,
                            jsonFileLogObserver)

FORMATS = ("text", "json")
LEVELS = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}
DEFAULT_LEVEL = "info"


class PerSecondTime:
    """twistd's text time stamp (RFC 3339, whole seconds), worked out once a second
    rather than for every line: a line per connection makes it a visible cost."""

    def __init__(self):
        self._second = None
        self._text = ""

    def __call__(self, when) -> str:
        if when is None:
            return formatTime(when)
        second = int(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second)
        return self._text


def text_observer(output):
    """twistd's text lines ("<time> [<system>] <message>") written to `output`."""
    format_time = PerSecondTime()
    return FileLogObserver(output, lambda event: formatEventAsClassicLogText(event, format_time))


def stdout_observer(log_format: str, level: str):
    """An observer writing `log_format` lines to standard output, from `level` up."""
    if log_format == "json":
        output = jsonFileLogObserver(sys.stdout, recordSeparator="")
    else:
        output = text_observer(sys.stdout)
    return FilteringLogObserver(output, [LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])])


def _factory(log_format: str, level: str):
    return lambda: stdout_observer(log_format, level)


observers = SimpleNamespace(**{
    f"{log_format}_{level}": _factory(log_format, level) for log_format in FORMATS for level in LEVELS
})


def observer_name(log_format: str, level: str) -> str:
    """The dotted name twistd's --logger takes for this format and level."""
    return f"{__name__}.observers.{log_format}_{level}"
