"""Cycle-collector settings for a long-running server process.

CPython's full collections walk every tracked object, and stop the reactor meanwhile: a
server that has imported Twisted, Autobahn and cryptography and holds thousands of
connections pauses for tens of milliseconds at each one, which is what a browser sees as
tail latency. Once the service has started, `tune_collector` moves what exists then (the
code and the objects that live as long as the process) out of the collector's reach with
`gc.freeze()`, and lets more allocations pass between young collections. Closed
connections do not rely on the collector: they leave no reference cycle behind.
"""

import gc

YOUNG_COLLECTION_THRESHOLD = 10_000  # CPython's default is 700


def tune_collector() -> None:
    """Collect once, freeze what survives, and collect young objects less often."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, middle, old)


def collector_status() -> dict:
    """The collector's state for /status: frozen objects, thresholds, collections run."""
    return {
        "frozen_objects": gc.get_freeze_count(),
        "thresholds": list(gc.get_threshold()),
        "collections": [generation["collections"] for generation in gc.get_stats()],
    }
