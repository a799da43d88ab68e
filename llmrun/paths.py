"""Where llmrun's own files live: $LLMRUN_HOME, else the platform's user data directory."""

import sys
from pathlib import Path

from llmrun import settings


def llmrun_home() -> Path:
    """The root of llmrun's files (store, history, offload cache); not created here."""
    override = settings.LLMRUN_HOME.path()
    if override:
        return override
    if sys.platform == "win32":
        base = settings.LOCALAPPDATA.path() or Path.home() / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = settings.XDG_DATA_HOME.path() or Path.home() / ".local" / "share"
    return base / "llmrun"


def store_dir() -> Path:
    """llmrun's store of imported models: one folder per model name."""
    return llmrun_home() / "models"


def history_file() -> Path:
    """The chat REPL's input history."""
    return llmrun_home() / "history"




def cache_dir() -> Path:
    """Rebuildable files (the compiled CPU kernels): $LLMRUN_CACHE, else the platform's user
    cache directory. Shared by every LLMRUN_HOME; safe to delete."""
    override = settings.LLMRUN_CACHE.path()
    if override:
        return override
    if sys.platform == "win32":
        return (settings.LOCALAPPDATA.path() or Path.home() / "AppData" / "Local") / "llmrun" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "llmrun"
    return (settings.XDG_CACHE_HOME.path() or Path.home() / ".cache") / "llmrun"


def calibration_file() -> Path:
    """This machine's speed figures the planner reads (plan/calibration.py): measured once, refreshed
    by runs, shared by every LLMRUN_HOME on the machine."""
    return cache_dir() / "calibration.json"
