"""Log output formats for twistd: `--log-format json` selects `json_observer`."""

import sys

from twisted.logger import jsonFileLogObserver


def json_observer():
    """One JSON object per line on standard output, every event field kept."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
