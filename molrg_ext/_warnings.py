"""Silencing a library's warnings around one call, for this package's own code.

warnings.catch_warnings saves and restores the process-wide filter list (unless Python's
context-aware warnings are on), so two threads inside it at once could leave one thread's filters
installed for good and swallow the user's warnings. The lock keeps this package's own uses apart,
which also runs those calls one thread at a time. Warnings that other code raises in other
threads meanwhile still meet the filters set here, and ``recording`` records them too.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

_LOCK = threading.RLock()  # re-entrant: an experiment silences EnSC, which silences sklearn


@contextlib.contextmanager
def ignoring(*filters: tuple[str, type[Warning]]):
    """Inside the block, warnings matching any ``(message regex, category)`` are ignored."""
    with _LOCK, warnings.catch_warnings():
        for message, category in filters:
            warnings.filterwarnings("ignore", message, category)
        yield


@contextlib.contextmanager
def recording(category: type[Warning]):
    """Inside the block, every warning is recorded into the yielded list instead of shown, those
    of ``category`` always (even repeats); the caller re-emits what it does not consume."""
    with _LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", category)
        yield caught
