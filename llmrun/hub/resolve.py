"""Model resolution: a name (path, store entry, alias, repo id) → a ModelSource, in one fixed order."""

from __future__ import annotations

from pathlib import Path

from llmrun.errors import InvalidModelError, ModelNotDownloadedError, ModelNotFoundError, ModelUnavailableError
from llmrun.hub import store
from llmrun.hub.aliases import find_alias, suggest_aliases
from llmrun.hub.hf_cache import find_cached_snapshot, is_offline, is_repo_id
from llmrun.hub.source import ModelSource, validate_model_folder


def resolve_model(name: str) -> ModelSource:
    """Find the model called `name` on this machine, in this order:

    1. an existing local path: a model folder ("local"), or a .gguf file (imported into the store once);
    2. llmrun's store entry called `name`;
    3. an alias → its repo id (an alias's own store entry was found in 2);
    4. that repo id in the Hugging Face cache ("hf-cache").

    A known model that is absent raises ModelNotDownloadedError (online: a caller that may download
    pulls it) or, offline, ModelUnavailableError; both name the pull command. Nothing is downloaded here.
    """
    local = _resolve_path(name)
    if local is not None:
        return local
    present = find_present(name)
    if present is not None:
        return present
    _, display_name = hub_target(name)
    if is_offline():
        raise ModelUnavailableError(
            f"model '{display_name}' is not available offline; run `llmrun pull {display_name}` when online"
        )
    raise ModelNotDownloadedError(f"model '{display_name}' is not downloaded; run `llmrun pull {display_name}`")


def hub_target(name: str) -> tuple[str, str]:
    """(repo id, name to show) for an alias or an `org/name` repo id; unknown names raise."""
    alias = find_alias(name)
    repo_id = alias.repo_id if alias else (name if is_repo_id(name) else None)
    if repo_id is None:
        raise unknown_model_error(name)
    return repo_id, alias.name if alias else repo_id


def find_present(name: str) -> ModelSource | None:
    """Steps 2–4 without the network: a store entry, or the name's (or alias's) repo in the Hub cache."""
    alias = find_alias(name)
    for entry_name in (name, alias.name if alias else None):
        folder = store.find_entry(entry_name) if entry_name else None
        if folder is not None:
            return ModelSource(name=folder.name, path=folder, source="store")
    repo_id = alias.repo_id if alias else (name if is_repo_id(name) else None)
    snapshot = find_cached_snapshot(repo_id) if repo_id else None
    if snapshot is None:
        return None
    return ModelSource(name=alias.name if alias else repo_id, path=snapshot, source="hf-cache",
                       repo_id=repo_id)


def looks_like_path(name: str) -> bool:
    """True for names that can only mean a file or folder: ./x, ../x, /x, ~/x, C:\\x, x.gguf."""
    return (
        ("/" in name and name.startswith((".", "/", "~")))
        or "\\" in name
        or name in (".", "..", "~")
        or name.lower().endswith(".gguf")
    )


def unknown_model_error(name: str) -> ModelNotFoundError:
    """The one-line error for a name that is no path, store entry, alias or repo id."""
    suggestions = suggest_aliases(name)
    if suggestions:
        return ModelNotFoundError(f"unknown model '{name}'; did you mean: {', '.join(suggestions)}? "
                                  "Run `llmrun models` to list local models.")
    return ModelNotFoundError(f"unknown model '{name}'; use an alias (e.g. smollm2), a Hub repo id "
                              "(org/name), a model folder or a .gguf file. "
                              "Run `llmrun models` to list local models.")


def existing_gguf_file(name: str) -> Path | None:
    """The checked, resolved GGUF file `name` points at, or None when it names no .gguf file."""
    path = Path(name).expanduser()
    if path.suffix.lower() != ".gguf" or not path.is_file():
        return None
    from llmrun.hub.gguf_import import check_gguf_file

    return check_gguf_file(path).resolve()


def _resolve_path(name: str) -> ModelSource | None:
    """Step 1: a ModelSource for an existing path; None when `name` is not a path at all."""
    path = Path(name).expanduser()
    if not path.exists():
        if looks_like_path(name):
            raise ModelNotFoundError(f"no such file or folder: {name}")
        return None
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from llmrun.hub.gguf_import import import_gguf_once

            return import_gguf_once(path)
        if not looks_like_path(name) and _is_known_name(name):
            return None  # a stray file called like an alias in the current folder
        raise InvalidModelError(f"{name} is a file, not a model folder or a .gguf file")
    try:
        validate_model_folder(path)
    except InvalidModelError:
        if not looks_like_path(name) and _is_known_name(name):
            return None  # a folder in the current directory that happens to share an alias's name
        raise
    folder = path.resolve()
    return ModelSource(name=folder.name, path=folder, source="local")


def _is_known_name(name: str) -> bool:
    return find_alias(name) is not None or store.find_entry(name) is not None
