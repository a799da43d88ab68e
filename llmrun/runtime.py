"""Opening a model by name for a command: resolve it, then build an Engine with progress shown."""

from __future__ import annotations

from dataclasses import dataclass

from llmrun.engine.build import EngineOptions


@dataclass
class OpenModel:
    name: str
    path: object
    engine: object

    @property
    def tokenizer(self):
        return self.engine.tokenizer


def open_model(name: str, options: EngineOptions, *, show_progress: bool = True) -> OpenModel:
    """Resolve `name` (path, store, alias, HF cache, download) and load it."""
    from llmrun.display import layer_progress, stderr_is_tty
    from llmrun.engine.build import build_engine
    from llmrun.hub.resolve import resolve_model
    from llmrun.model.config import read_config_json

    source = resolve_model(name)
    num_layers = int(read_config_json(source.path).get("num_hidden_layers", 0))
    with layer_progress(f"loading {source.name}", num_layers, enabled=show_progress) as on_layer:
        engine = build_engine(source.path, options, on_layer=on_layer)
    if show_progress and stderr_is_tty() and engine.plan.placement.streams:
        from llmrun.display import SlowStepProgress

        engine.runner.weights.on_step_layer = SlowStepProgress()
    return OpenModel(source.name, source.path, engine)
