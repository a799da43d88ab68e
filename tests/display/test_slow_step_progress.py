"""The streaming progress line: shown only once a step is slow, with layer k/L and GB/s, then gone."""

import io

from rich.console import Console

from llmrun.display import SlowStepProgress


def make(delay_s):
    progress = SlowStepProgress(delay_s=delay_s)
    progress.console = Console(file=io.StringIO(), force_terminal=True, width=100)
    return progress


def test_fast_steps_show_nothing():
    progress = make(delay_s=60)
    for layer in range(4):
        progress.layer(layer, 4, layer * 10**9)
    assert progress._status is None
    progress.step_done()


def test_slow_step_shows_layer_and_rate_then_clears():
    progress = make(delay_s=0)
    progress.layer(0, 4, 0)
    progress.layer(2, 4, 2 * 10**9)
    assert progress._status is not None
    assert "layer 3/4" in str(progress._status.renderable.text)
    assert "GB/s" in str(progress._status.renderable.text)
    progress.step_done()
    assert progress._status is None


def test_loading_progress_counts_layers_and_bytes(monkeypatch):
    import rich.progress

    from llmrun import display

    updates = []

    class RecordingProgress(rich.progress.Progress):
        def update(self, task_id, **fields):
            updates.append(fields)
            super().update(task_id, **fields)

    monkeypatch.setattr(display.progress, "stderr_is_tty", lambda: True)
    monkeypatch.setattr(rich.progress, "Progress", RecordingProgress)
    with display.layer_progress("loading", 3) as on_layer:
        for layer in range(3):
            on_layer(layer, 1024 * 1024)
    assert updates[-1] == {"completed": 3, "loaded": "3.00 MiB"}
