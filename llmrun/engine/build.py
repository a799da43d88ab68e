"""Building an Engine from a resolved model folder: dtype, config, weights, tokenizer, EOS ids."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from llmrun.errors import InvalidModelError, UsageError
from llmrun.plan.make import PlanRequest

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_CONTEXT = 4096


@dataclass(frozen=True)
class EngineOptions(PlanRequest):
    """What `llmrun plan` plans (budgets, ctx, batch = sequences decoded together, dtype), plus
    how the loaded engine streams: the plan and the engine never disagree on a field."""

    prefetch_depth: int = 1


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


def build_engine(folder: Path, options: EngineOptions, on_layer: Optional[Callable[[int, int], None]] = None):
    """Plan a model folder exactly as `llmrun plan` does, then load it as placed into an Engine."""
    from llmrun.engine.generate import Engine
    from llmrun.engine.tokenizer import load_tokenizer
    from llmrun.model.config import model_config, read_config_json
    from llmrun.model.registry import architecture_of, config_family, decoder_class
    from llmrun.plan.make import make_plan
    from llmrun.plan.placement import Tier
    from llmrun.weights.index import build_index
    from llmrun.weights.placed import PlacedWeights

    folder = Path(folder)
    raw_config = read_config_json(folder)  # the same dict `llmrun plan` plans from
    architecture = architecture_of(folder, raw_config)
    config = model_config(raw_config, architecture, config_family(architecture, raw_config.get("model_type")))
    index = build_index(folder)
    report = make_plan(raw_config, index, options, folder)
    placement = report.placement
    if placement.compute_tier is Tier.GPU and report.measured.gpu_free_bytes is None:
        raise UsageError("--gpu-mem was given but no CUDA GPU is available; use --gpu-mem 0")
    device = "cuda" if placement.compute_tier is Tier.GPU else "cpu"
    dtype = pick_dtype(report.dtype, device)
    tokenizer = load_tokenizer(folder)
    decoder = decoder_class(architecture)(config, dtype, device, max_positions=placement.ctx)
    rss_before_weights = current_rss_bytes()
    weights = PlacedWeights(decoder, index, placement, dtype, device, options.prefetch_depth, on_layer)
    engine = Engine(
        decoder, weights, tokenizer, eos_token_ids(folder, config.raw, tokenizer),
        max_context=placement.ctx, max_num_seqs=placement.batch,
        num_blocks=placement.num_kv_blocks, block_size=placement.block_size,
    )
    engine.plan = report
    engine.rss_before_weights_bytes = rss_before_weights
    return engine


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (0 where unknown).

    Linux: VmHWM, which starts afresh at exec (ru_maxrss would carry the parent's peak over).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
