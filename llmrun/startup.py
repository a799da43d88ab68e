"""Start-up without the cyclic garbage collector's full passes.

Importing torch and loading a model create a few hundred thousand long-lived objects; with the
collector on, its passes over them cost 0.3-0.4 s of a `llmrun run` start on the development VM
(docs/performance.md). The console entry point (launch.py) pauses collection first thing; once a
model is loaded, what start-up built is frozen (moved where collections never look again, as
CPython's gc.freeze documents for long-lived state) and collection resumes, so a chat or a server
still frees its cycles, and its later passes skip the frozen objects. A command that never loads a
model gets collection back after RESUME_AFTER_S at the latest. Code that never called
pause_collection (the tests, a library user) is left exactly as it was.
"""

from __future__ import annotations

import gc
import threading

RESUME_AFTER_S = 10.0

_lock = threading.Lock()
_paused = False


def pause_collection() -> None:
    """Turn automatic collection off until resume_collection() (or RESUME_AFTER_S from now)."""
    global _paused
    with _lock:
        if _paused or not gc.isenabled():
            return
        gc.disable()
        _paused = True
    timer = threading.Timer(RESUME_AFTER_S, resume_collection)
    timer.daemon = True
    timer.start()


def resume_collection() -> None:
    """Freeze what exists now and turn collection back on; nothing when it was not paused here."""
    global _paused
    with _lock:
        if not _paused:
            return
        _paused = False
        gc.freeze()
        gc.enable()


def collection_paused() -> bool:
    return _paused
