"""Test-run settings: Hypothesis keeps no example database (no files left behind)."""

from hypothesis import settings

settings.register_profile("pydio-ws", database=None, deadline=None)
settings.load_profile("pydio-ws")
