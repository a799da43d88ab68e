"""What a GGUF file becomes once imported (its config.json and tensor shapes), read from its header alone.

`llmrun plan FILE.gguf` promises to work before loading anything: transformers reads the GGUF's
metadata into a config without touching tensor data, and a model built on the meta device gives the
names and shapes the import will write (float32, a tied head left out, as gguf_import does).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from llmrun.errors import InvalidModelError
from llmrun.weights.index import CheckpointIndex, TensorInfo

IMPORTED_DTYPE = "F32"  # gguf_import dequantizes to float32
_FLOAT32_BYTES = 4


def imported_config_and_index(gguf_file: Path) -> tuple[dict, CheckpointIndex]:
    """(config.json as the import writes it, the index of its model.safetensors), without converting."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmrun.hub.gguf_import import quiet_transformers

    with quiet_transformers(), tempfile.TemporaryDirectory() as empty:
        try:
            config = AutoConfig.from_pretrained(empty, gguf_file=str(gguf_file))
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        except (ValueError, KeyError, IndexError, TypeError, OSError, RuntimeError, NotImplementedError) as err:
            lines = str(err).strip().splitlines()
            reason = lines[0] if lines else type(err).__name__
            raise InvalidModelError(f"cannot read {gguf_file.name}'s header: {reason}") from None
    return _config_dict(model), _meta_index(model, gguf_file)


def _config_dict(model) -> dict:
    """The config.json gguf_import._write_config writes, as a dict."""
    config = json.loads(model.config.to_json_string())
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    return config


def _meta_index(model, gguf_file: Path) -> CheckpointIndex:
    """Tensor names and shapes of the import's weights; byte ranges laid end to end (never read)."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tensors, offset = {}, 0
    for name, tensor in state.items():
        size = tensor.numel() * _FLOAT32_BYTES
        tensors[name] = TensorInfo(name, gguf_file, IMPORTED_DTYPE, tuple(tensor.shape), offset, offset + size)
        offset += size
    return CheckpointIndex(gguf_file.parent, tensors)
