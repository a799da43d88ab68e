"""ModelSource (where a resolved model's files are) and the check that a folder holds a usable model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmrun.errors import InvalidModelError

SOURCE_KINDS = ("local", "store", "hf-cache", "download")
INDEX_FILE = "model.safetensors.index.json"
# Weight formats llmrun does not read (pickles and llama.cpp files): named when they are all there is.
UNREAD_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf")
# Any one of these sets describes a tokenizer transformers can load.
TOKENIZER_FILE_SETS = (
    ("tokenizer.json",),
    ("tokenizer.model",),
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
)


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder holding config.json, *.safetensors and tokenizer files."""

    name: str  # display name: alias, store name, repo id, or the folder's name
    path: Path
    source: str  # one of SOURCE_KINDS
    repo_id: str | None = None

    def __post_init__(self) -> None:
        assert self.source in SOURCE_KINDS, self.source


def validate_model_folder(path: Path) -> None:
    """Raise InvalidModelError (one line) unless `path` holds config, safetensors weights and a tokenizer.

    Only names and the shard index are checked here; safetensors headers are read when loading.
    """
    path = Path(path)
    if not path.is_dir():
        raise InvalidModelError(f"{path} is not a model folder")
    _check_config(path)
    _check_weights(path)
    if not any(all((path / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS):
        raise InvalidModelError(
            f"{path} has no tokenizer (needs tokenizer.json, tokenizer.model or vocab files)"
        )


def _check_config(path: Path) -> None:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InvalidModelError(f"{path} has no config.json")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidModelError(f"cannot read {config_file}: {_one_line(err)}") from None
    if not isinstance(config, dict):
        raise InvalidModelError(f"{config_file} is not a JSON object")


def _check_weights(path: Path) -> None:
    if not any(path.glob("*.safetensors")):
        others = sorted({p.suffix for p in path.iterdir() if p.suffix in UNREAD_WEIGHT_SUFFIXES})
        if others:
            raise InvalidModelError(
                f"{path} has only {'/'.join(others)} weights; llmrun reads safetensors only"
            )
        raise InvalidModelError(f"{path} has no *.safetensors weights")
    index_file = path / INDEX_FILE
    if not index_file.is_file():
        return
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        shard_names = set(weight_map.values())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise InvalidModelError(f"cannot read {index_file}: {_one_line(err)}") from None
    missing = sorted(name for name in shard_names if not (path / name).is_file())
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise InvalidModelError(f"{path} is missing weight shards listed in {INDEX_FILE}: {shown}")


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
