"""Test-run settings: Hypothesis keeps no example database and writes its caches to a
temporary directory removed at the end of the run, so no files are left behind."""

import shutil
import tempfile

from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="pydio-ws-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
settings.register_profile("pydio-ws", database=None, deadline=None)
settings.load_profile("pydio-ws")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)
