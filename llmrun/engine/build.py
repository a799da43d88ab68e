"""Building an Engine from a resolved model folder: dtype, config, weights, tokenizer, EOS ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from llmrun.errors import InvalidModelError, UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_CONTEXT = 4096


@dataclass(frozen=True)
class EngineOptions:
    dtype: str = "auto"
    device: Optional[str] = None          # None: cuda when available, else cpu
    ctx: Optional[int] = None             # context tokens per sequence; None: model max capped
    max_num_seqs: int = 1
    block_size: int = 16


def pick_device(requested: Optional[str]) -> str:
    import torch

    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX); read without torch."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def dtype_name(name: str, device: str) -> str:
    """The concrete dtype for --dtype; auto is bfloat16 where the hardware computes it natively."""
    if name not in DTYPES:
        raise UsageError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    if name != "auto":
        return name
    if device.startswith("cuda"):
        from llmrun.plan.devices import has_cuda

        if not has_cuda():
            return "float16"  # planning for a GPU this machine lacks: fp16 runs on every CUDA GPU
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def pick_dtype(name: str, device: str):
    """The torch dtype for --dtype (see dtype_name)."""
    import torch

    return getattr(torch, dtype_name(name, device))


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def context_length(requested: Optional[int], model_max: int) -> int:
    if requested is None:
        return min(model_max, DEFAULT_MAX_CONTEXT)
    if requested < 2:
        raise UsageError(f"--ctx must be at least 2 tokens, got {requested}")
    if requested > model_max:
        raise UsageError(f"--ctx {requested} is beyond the model's maximum context of {model_max} tokens")
    return requested


def eos_token_ids(folder: Path, config_raw: dict, tokenizer) -> list[int]:
    """EOS ids as transformers' generate uses them: generation_config.json first."""
    candidates = []
    gen_path = Path(folder) / "generation_config.json"
    if gen_path.is_file():
        try:
            candidates.append(json.loads(gen_path.read_text()).get("eos_token_id"))
        except ValueError as err:
            raise InvalidModelError(f"{gen_path} is not valid JSON") from err
    candidates += [config_raw.get("eos_token_id"), tokenizer.eos_token_id]
    for value in candidates:
        if value is not None:
            return [value] if isinstance(value, int) else list(value)
    return []


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise InvalidModelError(f"cannot load the tokenizer in {folder}: {str(err).splitlines()[0]}") from err


def build_engine(folder: Path, options: EngineOptions, on_layer: Optional[Callable[[int], None]] = None):
    """Load a model folder into a ready Engine (all weights resident on one device)."""
    from llmrun.engine.generate import Engine
    from llmrun.model.config import load_model_config
    from llmrun.model.registry import architecture_of, decoder_class
    from llmrun.weights.index import build_index
    from llmrun.weights.loader import load_resident_weights

    folder = Path(folder)
    architecture = architecture_of(folder)
    config = load_model_config(folder, architecture)
    device = pick_device(options.device)
    dtype = pick_dtype(options.dtype, device)
    ctx = context_length(options.ctx, config.max_position_embeddings)
    index = build_index(folder)
    tokenizer = load_tokenizer(folder)
    decoder = decoder_class(architecture)(config, dtype, device, max_positions=ctx)
    weights = load_resident_weights(decoder, index, dtype, device, on_layer)
    blocks_per_seq = -(-ctx // options.block_size)
    return Engine(
        decoder, weights, tokenizer, eos_token_ids(folder, config.raw, tokenizer),
        max_context=ctx, max_num_seqs=options.max_num_seqs,
        num_blocks=blocks_per_seq * options.max_num_seqs, block_size=options.block_size,
    )
