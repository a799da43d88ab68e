"""Progress on stderr: model loading, pulls and imports, slow streamed steps, stats lines."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from llmrun.weights.observer import StepObserver


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()


@contextmanager
def layer_progress(description: str, total: int, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A per-layer progress bar with the bytes loaded, on stderr, only on a TTY and after ~0.5 s.

    Yields on_layer(layer_idx, num_bytes): layer `layer_idx` is placed, `num_bytes` of it were read.
    """
    if not (enabled and stderr_is_tty() and total > 0):
        yield lambda layer_idx, num_bytes=0: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llmrun.sizes import format_bytes

    started = time.monotonic()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("layers, {task.fields[loaded]}"), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=True)
    task = progress.add_task(description, total=total, loaded=format_bytes(0))
    shown, loaded = False, 0

    def on_layer(layer_idx: int, num_bytes: int = 0) -> None:
        nonlocal shown, loaded
        loaded += num_bytes
        progress.update(task, completed=layer_idx + 1, loaded=format_bytes(loaded))
        if not shown and time.monotonic() - started > 0.5:
            progress.start()
            shown = True

    try:
        yield on_layer
    finally:
        if shown:
            progress.stop()


@contextmanager
def count_progress(description: str, unit: str, *, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A bar of `done` of `total` (e.g. tensors quantized), on stderr, only on a TTY and after ~0.5 s.

    Yields on_count(done, total); the bar goes away when done reaches total, so another may follow.
    """
    if not (enabled and stderr_is_tty()):
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    started = time.monotonic()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(unit),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = progress.add_task(description, total=None)
    state = {"shown": False}

    def on_count(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)
        if not state["shown"] and done < total and time.monotonic() - started > 0.5:
            progress.start()
            state["shown"] = True
        elif state["shown"] and done >= total:
            progress.stop()
            state["shown"] = False

    try:
        yield on_count
    finally:
        if state["shown"]:
            progress.stop()


def print_stats(line: str) -> None:
    """The dim stats line on stderr (plain when stderr is not a TTY)."""
    if stderr_is_tty():
        from rich.console import Console

        Console(stderr=True).print(line, style="dim", highlight=False)
    else:
        print(line, file=sys.stderr)


def note(message: str) -> None:
    """One `llmrun: ...` line on stderr: what the hub did on the user's behalf."""
    print(f"llmrun: {message}", file=sys.stderr, flush=True)


@contextmanager
def progress_steps(description: str, total: int) -> Iterator[Callable[[str], None]]:
    """Yield `step(text)`: each call finishes the previous step and names the next (TTY only)."""
    if not stderr_is_tty():
        yield lambda text: None
        return
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(file=sys.stderr), transient=True)
    task = progress.add_task(description, total=total)
    started = False

    def step(text: str) -> None:
        nonlocal started
        progress.update(task, advance=1 if started else 0, description=f"{description}: {text}")
        started = True

    with progress:
        yield step


@contextmanager
def download_progress(description: str, total_bytes: int) -> Iterator[Callable[[int, str], None]]:
    """Yield `advance(num_bytes, file_name)` for a byte-counting bar on stderr (TTY only)."""
    if not stderr_is_tty():
        yield lambda num_bytes, file_name: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), TimeRemainingColumn(),
                        console=Console(file=sys.stderr), transient=True)
    task = progress.add_task(description, total=total_bytes or None)

    def advance(num_bytes: int, file_name: str) -> None:
        progress.update(task, advance=num_bytes, description=f"{description} {file_name}")

    with progress:
        yield advance


class SlowStepProgress(StepObserver):
    """Shows "layer k/L, x GB/s" on stderr while one forward step takes longer than ~1 s (TTY only).

    It watches layers, so CUDA graphs do not replay while it is shown (ModelRunner.replay_graphs).
    """

    watches_layers = True

    def __init__(self, delay_s: float = 1.0):
        from rich.console import Console

        self.delay_s = delay_s
        self.console = Console(stderr=True)
        self._status = None
        self._step_start = time.monotonic()
        self._bytes_at_start = 0

    def layer(self, layer_idx: int, num_layers: int, bytes_moved: int) -> None:
        """Called before each layer of a step."""
        now = time.monotonic()
        if layer_idx == 0:
            self._step_start, self._bytes_at_start = now, bytes_moved
            self.stop()
            return
        elapsed = now - self._step_start
        if elapsed < self.delay_s:
            return
        rate = (bytes_moved - self._bytes_at_start) / elapsed / 1e9
        text = f"streaming weights: layer {layer_idx + 1}/{num_layers}, {rate:.2f} GB/s"
        if self._status is None:
            self._status = self.console.status(text)
            self._status.start()
        else:
            self._status.update(text)

    def step_done(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None
