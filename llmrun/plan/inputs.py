"""The plan inputs of a model: the only reader of its config.json, architecture and checkpoint index.

`llmrun plan` reads them for a name (local, a GGUF header, or the Hub's metadata); run, chat and
bench read them for the folder they resolved or pulled. The engine is built from these, reading none again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from llmrun.errors import DownloadError, ModelUnavailableError
from llmrun.weights.index import CheckpointIndex, TensorInfo


@dataclass(frozen=True)
class PlanInputs:
    name: str
    folder: Optional[Path]        # the model folder, the .gguf file itself, or None (Hub metadata)
    config: dict
    index: CheckpointIndex
    architecture: str


def plan_inputs(name: str) -> PlanInputs:
    """Local models are read from disk; absent ones from the Hub's metadata when it can be reached."""
    from llmrun.hub.resolve import existing_gguf_file, resolve_model

    gguf_file = existing_gguf_file(name)
    if gguf_file is not None:
        return _gguf_inputs(gguf_file)
    try:
        source = resolve_model(name)
    except ModelUnavailableError as unavailable:
        return _remote_inputs(name, unavailable)
    return folder_inputs(source.path, source.name)


def folder_inputs(folder: Path, name: Optional[str] = None) -> PlanInputs:
    """A model folder's config.json, architecture (checked against the registry) and safetensors headers."""
    from llmrun.model.config import read_config_json
    from llmrun.weights.index import build_index

    folder = Path(folder)
    config = read_config_json(folder)
    architecture = _architecture(folder, config)
    index = build_index(folder)
    return PlanInputs(name or folder.name, folder, head_as_stored(config, index), index, architecture)


def head_as_stored(config: dict, index: CheckpointIndex) -> dict:
    """The config with a stored lm_head.weight as the output head, whatever tie_word_embeddings says:
    transformers unties a tied config whose checkpoint holds both tables with different values (and
    with equal ones either projection gives the same logits), so the plan and the decoder do as it does."""
    if "lm_head.weight" in index.tensors and config.get("tie_word_embeddings") is not False:
        return {**config, "tie_word_embeddings": False}
    return config


def _architecture(where: Path, config: dict) -> str:
    """The one rule: the first listed architecture the registry supports (else a one-line error)."""
    from llmrun.model.registry import architecture_of

    return architecture_of(where, config)


def _gguf_inputs(gguf_file: Path) -> PlanInputs:
    """A .gguf file, planned as what its import will be: the store entry when made, else its header."""
    from llmrun.hub.gguf_header import imported_config_and_index
    from llmrun.hub.gguf_entries import path_entry_name, reusable_entry

    entry_name = path_entry_name(gguf_file)
    imported = reusable_entry(gguf_file, entry_name)
    if imported is not None:
        return replace(folder_inputs(imported.path, entry_name), folder=gguf_file)
    config, index = imported_config_and_index(gguf_file)
    return PlanInputs(entry_name, gguf_file, head_as_stored(config, index), index, _architecture(gguf_file, config))


def _remote_inputs(name: str, unavailable: ModelUnavailableError) -> PlanInputs:
    """Config and safetensors headers of a Hub repo, without downloading weights."""
    from llmrun.hub.aliases import find_alias
    from llmrun.hub.hf_cache import is_offline

    alias = find_alias(name)
    repo_id = alias.repo_id if alias else name
    if is_offline():
        raise unavailable
    import huggingface_hub

    from llmrun.hub.pull import HubUnreachableError, hub_errors

    try:
        with hub_errors(repo_id):
            revision = huggingface_hub.HfApi().model_info(repo_id).sha  # fails fast when unreachable
            config_path = huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision)
            config = json.loads(Path(config_path).read_text())
            metadata = huggingface_hub.get_safetensors_metadata(repo_id, revision=revision)
    except HubUnreachableError as err:
        raise ModelUnavailableError(f"{name} is not downloaded and the Hub cannot be reached ({err}); "
                                    f"run `llmrun pull {name}` when online") from None
    except ValueError as err:
        raise DownloadError(f"cannot read {repo_id}'s config from the Hub: {err}") from None
    tensors = {}
    for file_name, file_meta in metadata.files_metadata.items():
        for tensor_name, info in file_meta.tensors.items():
            start, end = info.data_offsets
            tensors[tensor_name] = TensorInfo(tensor_name, Path(file_name), info.dtype, tuple(info.shape),
                                              start, end)
    index = CheckpointIndex(Path(repo_id), tensors)
    return PlanInputs(name, None, head_as_stored(config, index), index, _architecture(Path(repo_id), config))
