"""The step observer: what watches a forward step layer by layer (progress while layers stream)."""

from __future__ import annotations


class StepObserver:
    """Watches a forward step layer by layer; this base one watches nothing.

    An observer that watches layers (`watches_layers`) is Python a CUDA graph would skip, so the
    engine then runs its static decode steps eagerly instead of replaying them.
    """

    watches_layers = False

    def layer(self, layer_idx: int, num_layers: int, bytes_moved: int) -> None:
        """Called before layer `layer_idx` of a step runs, with the bytes streamed so far."""

    def step_done(self) -> None:
        """Called when a step's forward has finished."""


NO_STEP_OBSERVER = StepObserver()
