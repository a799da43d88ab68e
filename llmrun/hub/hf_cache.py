"""The Hugging Face Hub cache (the one transformers uses): where it is, what it holds; offline mode."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from llmrun import settings
from llmrun.errors import InvalidModelError
from llmrun.hub.source import validate_model_folder

_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_REPO_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class CachedRepo:
    """A model repo in the Hub cache whose `main` snapshot is complete."""

    repo_id: str
    snapshot_path: Path


def hub_cache_dir() -> Path:
    """The Hub cache folder, read from the environment now (not at import) like huggingface_hub does."""
    for setting in (settings.HF_HUB_CACHE, settings.HUGGINGFACE_HUB_CACHE):
        if setting.path():
            return setting.path()
    if settings.HF_HOME.path():
        return settings.HF_HOME.path() / "hub"
    return (settings.XDG_CACHE_HOME.path() or Path.home() / ".cache") / "huggingface" / "hub"


def is_offline() -> bool:
    """True when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for no network access at all."""
    if settings.HF_HUB_OFFLINE.is_on() or settings.TRANSFORMERS_OFFLINE.is_on():
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def is_repo_id(name: str) -> bool:
    """True for names shaped like a Hub repo id: `org/name`."""
    return bool(_REPO_ID_RE.fullmatch(name)) and ".." not in name


def repo_folder(repo_id: str) -> Path:
    """The cache folder of a model repo: `models--org--name`."""
    return hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def find_cached_snapshot(repo_id: str) -> Path | None:
    """The snapshot that `refs/main` names, when it holds a complete model; else None."""
    folder = repo_folder(repo_id)
    try:
        commit = (folder / "refs" / "main").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not _COMMIT_RE.fullmatch(commit):
        return None
    snapshot = folder / "snapshots" / commit
    try:
        validate_model_folder(snapshot)
    except InvalidModelError:
        return None
    return snapshot


def list_cached_repos() -> list[CachedRepo]:
    """Every model repo in the cache with a complete `main` snapshot, sorted by repo id."""
    try:
        folders = [p for p in hub_cache_dir().iterdir() if p.name.startswith("models--")]
    except OSError:
        return []
    repos = []
    for folder in folders:
        parts = folder.name[len("models--"):].split("--", 1)
        if len(parts) != 2:
            continue  # a repo without an org (legacy "gpt2"-style ids) is skipped
        repo_id = "/".join(parts)
        snapshot = find_cached_snapshot(repo_id)
        if snapshot is not None:
            repos.append(CachedRepo(repo_id, snapshot))
    return sorted(repos, key=lambda repo: repo.repo_id.lower())


def write_main_ref(repo_id: str, commit: str) -> None:
    """Point `refs/main` at `commit` (atomically), as huggingface_hub's snapshot_download does."""
    assert _COMMIT_RE.fullmatch(commit), commit
    refs = repo_folder(repo_id) / "refs"
    refs.mkdir(parents=True, exist_ok=True)
    temp = refs / f".main.{os.getpid()}.tmp"
    temp.write_text(commit, encoding="ascii")
    os.replace(temp, refs / "main")
