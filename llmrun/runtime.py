"""Opening a model by name for a command: the one road resolve (or pull) → plan inputs → plan → build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmrun.engine.build import EngineOptions

if TYPE_CHECKING:
    from llmrun.engine.generate import Engine


@dataclass
class OpenModel:
    name: str
    path: Path
    engine: "Engine"

    @property
    def tokenizer(self):
        return self.engine.tokenizer


def present_or_pulled(name: str):
    """The ModelSource for `name`: found on this machine, else downloaded (`llmrun pull`) when the
    Hub may be reached; offline, the one-line error naming the pull command."""
    from llmrun.errors import ModelNotDownloadedError
    from llmrun.hub import pull
    from llmrun.hub.resolve import resolve_model

    try:
        return resolve_model(name)
    except ModelNotDownloadedError:
        return pull.pull_model(name)


def open_model(name: str, options: EngineOptions, *, show_progress: bool = True) -> OpenModel:
    """Resolve `name` (path, store, alias, HF cache, download), plan it as `llmrun plan` does, load it."""
    from llmrun import display
    from llmrun.engine.build import engine_from_plan
    from llmrun.plan.inputs import folder_inputs
    from llmrun.plan.make import make_plan
    from llmrun.startup import resume_collection
    from llmrun.weights.observer import NO_STEP_OBSERVER

    source = present_or_pulled(name)
    inputs = folder_inputs(source.path, source.name)
    report = make_plan(inputs.config, inputs.index, options, inputs.folder)
    # A slow step shows its layer and rate; only where layers stream and stderr is a terminal.
    slow_steps = show_progress and display.stderr_is_tty() and report.placement.streams
    observer = display.SlowStepProgress() if slow_steps else NO_STEP_OBSERVER
    num_layers = int(inputs.config.get("num_hidden_layers", 0))
    with display.count_progress(f"quantizing {source.name} to {options.quant}", "tensors",
                                enabled=show_progress) as on_quantize, \
            display.layer_progress(f"loading {source.name}", num_layers, enabled=show_progress) as on_layer:
        engine = engine_from_plan(inputs, report, options, on_layer=on_layer, step_observer=observer,
                                  on_quantize=on_quantize)
    resume_collection()  # start-up's objects frozen, collection on again (startup.py)
    quant = engine.weights.quant.meta
    if quant.tensors:  # a compressed path is never taken silently
        how = "quantized on load, cached" if options.quant != "none" else "as stored"
        display.note(f"{source.name}: {quant.describe()}, {how}")
    return OpenModel(source.name, source.path, engine)
