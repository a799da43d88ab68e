"""Building an Engine from a model's plan inputs and its plan: dtype, decoder, weights, tokenizer, EOS ids."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from llmrun.errors import InvalidModelError, UsageError
from llmrun.plan.make import PlanRequest
from llmrun.weights.observer import NO_STEP_OBSERVER, StepObserver

if TYPE_CHECKING:
    from llmrun.engine.generate import Engine
    from llmrun.plan.inputs import PlanInputs
    from llmrun.plan.make import PlanReport


@dataclass(frozen=True)
class EngineOptions(PlanRequest):
    """What `llmrun plan` plans (budgets, ctx, batch = sequences decoded together, dtype), plus
    how the loaded engine streams: the plan and the engine never disagree on a field."""

    prefetch_depth: int = 1


def torch_dtype(name: str):
    """The torch dtype for a concrete run dtype name (the plan's `dtype`)."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


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


def build_engine(folder: Path, options: EngineOptions,
                 on_layer: Optional[Callable[[int, int], None]] = None, kernels: Optional[Callable] = None) -> "Engine":
    """The whole road for a model folder: its plan inputs, the plan `llmrun plan` would show, the Engine
    (`kernels(shape, dtype, device)`, where given, makes the decoder's kernel set instead of kernels_for)."""
    from llmrun.plan.inputs import folder_inputs
    from llmrun.plan.make import make_plan

    inputs = folder_inputs(folder)
    return engine_from_plan(inputs, make_plan(inputs.config, inputs.index, options, inputs.folder), options,
                            on_layer=on_layer, kernels=kernels)


def engine_from_plan(inputs: "PlanInputs", report: "PlanReport", options: EngineOptions, *,
                     on_layer: Optional[Callable[[int, int], None]] = None,
                     step_observer: StepObserver = NO_STEP_OBSERVER,
                     on_quantize: Callable[[int, int], None] = lambda done, total: None,
                     kernels: Optional[Callable] = None) -> "Engine":
    """Load the model as planned into an Engine; config, architecture and index come from `inputs`
    (read once, by plan/inputs.py). `on_layer(i, bytes)` observes loading, `step_observer` each step,
    `on_quantize(done, total)` the tensors quantized on load (`--quant`, when not cached yet); `kernels`
    as build_engine's."""
    from llmrun.engine.generate import Engine
    from llmrun.engine.tokenizer import load_tokenizer
    from llmrun.kernels.choose import kernels_for
    from llmrun.model.config import model_config
    from llmrun.model.registry import config_family, decoder_class
    from llmrun.plan.devices import current_rss_bytes
    from llmrun.plan.tiers import Tier
    from llmrun.weights.placed import PlacedWeights

    architecture, raw_config, folder = inputs.architecture, inputs.config, inputs.folder
    config = model_config(raw_config, architecture, config_family(architecture, raw_config.get("model_type")))
    placement = report.placement
    if placement.compute_tier is Tier.GPU and report.measured.gpu_free_bytes is None:
        raise UsageError("--gpu-mem was given but no CUDA GPU is available; use --gpu-mem 0")
    device = "cuda" if placement.compute_tier is Tier.GPU else "cpu"
    dtype = torch_dtype(report.dtype)
    tokenizer = load_tokenizer(folder)
    family = decoder_class(architecture)
    make_kernels = kernels_for if kernels is None else kernels  # (kernels_for: ATen's ops, or fused ones that passed their check)
    decoder = family(config, dtype, device, max_positions=placement.ctx,
                     kernels=make_kernels(family.layer_shape(config), dtype, device))
    rss_before_weights = current_rss_bytes()
    index = inputs.index
    if options.quant != "none":  # a float model compressed on load, through the cache in $LLMRUN_HOME
        from llmrun.quant.cache import quantized_on_load
        from llmrun.quant.spec import QuantSpec

        index = quantized_on_load(index, QuantSpec.parse(options.quant), on_quantize)
    weights = PlacedWeights(decoder, index, placement, dtype, device, options.prefetch_depth, on_layer,
                            step_observer)
    return Engine(
        decoder, weights, tokenizer, eos_token_ids(folder, config.raw, tokenizer),
        plan=report, rss_before_weights_bytes=rss_before_weights, step_observer=step_observer,
    )
