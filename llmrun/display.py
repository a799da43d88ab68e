"""Rich renderers (tables, live tokens, progress): the only module that uses Rich."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator


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


def print_stats(line: str) -> None:
    """The dim stats line on stderr (plain when stderr is not a TTY)."""
    if stderr_is_tty():
        from rich.console import Console

        Console(stderr=True).print(line, style="dim", highlight=False)
    else:
        print(line, file=sys.stderr)


# --- model resolution, pulling and listing (llmrun.hub) ---


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


def format_count(count: int | None) -> str:
    """A parameter count for people: 134_515_008 -> "135M", 3_821_079_552 -> "3.8B"."""
    if count is None:
        return "?"
    for divisor, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= divisor:
            value = count / divisor
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return str(count)


def render_models(models) -> None:
    """The `llmrun models` table on stdout (LocalModel rows); a hint on stderr when there are none."""
    if not models:
        note("no local models yet; fetch a small one with `llmrun pull smollm2`, "
             "or convert a file with `llmrun import FILE.gguf`")
        return
    from rich.console import Console
    from rich.table import Table

    from llmrun.sizes import format_bytes

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column, justify in (("NAME", "left"), ("ARCHITECTURE", "left"), ("PARAMS", "right"),
                            ("DTYPE", "left"), ("SIZE", "right"), ("SOURCE", "left")):
        table.add_column(column, justify=justify, no_wrap=True,
                         overflow="fold" if column == "NAME" else "ellipsis")
    for model in models:
        table.add_row(model.name, model.architecture or "?", format_count(model.num_parameters),
                      model.dtype or "?", format_bytes(model.size_bytes), model.source)
    # In a pipe nothing is cut to 80 columns: `llmrun models | grep` sees whole names.
    Console(width=None if sys.stdout.isatty() else 1000).print(table)


def render_plan(plan_json: dict) -> None:
    """The plan as Rich tables on stdout: tiers with layer ranges, reservations, totals, estimate."""
    from rich.console import Console
    from rich.table import Table

    from llmrun.sizes import format_bytes

    console = Console()
    model = plan_json["model"]
    console.print(f"[bold]{model['name']}[/] ({model['architecture']}, {model['num_layers']} layers, "
                  f"{format_bytes(model['weight_bytes'])} in {plan_json['dtype']}) on "
                  f"[bold]{plan_json['compute'].upper()}[/]"
                  + (f" ({plan_json['gpu_name']})" if plan_json.get("gpu_name") else ""), highlight=False)
    table = Table(title="Placement", title_justify="left")
    for column in ("tier", "layers", "also holds", "weights", "reserved", "total", "budget"):
        table.add_column(column, justify="right" if column in ("weights", "reserved", "total", "budget") else "left")
    for tier, info in plan_json["tiers"].items():
        if not info["total_bytes"]:
            continue
        ranges = ", ".join(f"{s}-{e - 1}" if e - s > 1 else str(s) for s, e in info["layers"]) or "-"
        budget = info["budget_bytes"]
        table.add_row(tier.upper(), f"{ranges} ({info['num_layers']})", ", ".join(info["holds"]) or "-",
                      format_bytes(info["weight_bytes"]), format_bytes(info["reserved_bytes"]),
                      format_bytes(info["total_bytes"]), format_bytes(budget) if budget is not None else "-")
    console.print(table)
    reservations = Table(title="Reserved before weights", title_justify="left")
    for column in ("what", "tier", "bytes", "detail"):
        reservations.add_column(column)
    for r in plan_json["reservations"]:
        reservations.add_row(r["name"], r["tier"].upper(), format_bytes(r["bytes"]), r["detail"])
    console.print(reservations)
    kv, est = plan_json["kv_cache"], plan_json["estimate"]
    streamed = plan_json["streamed_bytes_per_token"]
    console.print(f"KV cache: {kv['num_blocks']} blocks of {kv['block_size']} tokens = {kv['tokens']} tokens "
                  f"({plan_json['ctx']} ctx x {plan_json['batch']} seq), {format_bytes(kv['bytes'])} on "
                  f"{kv['tier'].upper()}", highlight=False)
    console.print(f"Streamed per token: {format_bytes(streamed['total'])} "
                  f"(from CPU {format_bytes(streamed['cpu'])}, from disk {format_bytes(streamed['disk'])})",
                  highlight=False)
    bandwidths = ", ".join(f"{name} {v['bytes_per_s'] / 1e9:.1f} GB/s ({'measured' if v['measured'] else 'assumed'})"
                           for name, v in est["bandwidths"].items())
    console.print(f"Estimate: decode {est['decode_tok_s']['low']:.3g}-{est['decode_tok_s']['high']:.3g} tok/s "
                  f"per sequence, prefill ~{est['prefill_tok_s']:.0f} tok/s; {bandwidths}", highlight=False)
    for warning in plan_json["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


class SlowStepProgress:
    """Shows "layer k/L, x GB/s" on stderr while one forward step takes longer than ~1 s (TTY only)."""

    def __init__(self, delay_s: float = 1.0):
        from rich.console import Console

        self.delay_s = delay_s
        self.console = Console(stderr=True)
        self._status = None
        self._step_start = time.monotonic()
        self._bytes_at_start = 0

    def __call__(self, layer_idx, num_layers: int = 0, bytes_moved: int = 0) -> None:
        """Called before each layer; layer_idx None marks the end of a step."""
        if layer_idx is None:
            self.stop()
            return
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

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None


def render_bench(data: dict) -> None:
    """The benchmark report as a Rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    from llmrun.sizes import format_bytes

    console = Console()
    machine, placement = data["machine"], data["placement"]
    console.print(f"[bold]{data['model']}[/] {data['dtype']} on {machine.get('gpu') or machine['cpu']} "
                  f"({machine['threads']} threads), layers {placement['layer_tiers']}, "
                  f"median of {data['repetitions']}", highlight=False)
    compare = data["compare"]
    table = Table()
    for column in ("case", "TTFT s", "prefill tok/s", "decode tok/s"):
        table.add_column(column, justify="right" if column != "case" else "left")
    if compare != "none":
        for column in (f"{compare} decode", "decode x", "TTFT x", "same tokens"):
            table.add_column(column, justify="right")
    for name, entry in data["cases"].items():
        ours = entry["llmrun"]
        row = [name, f"{ours['ttft_s']['median']:.3f}", f"{ours['prefill_tok_s']['median']:.0f}",
               f"{ours['decode_tok_s']['median']:.1f} ({ours['decode_tok_s']['min']:.1f}-{ours['decode_tok_s']['max']:.1f})"]
        if compare != "none" and compare in entry:
            speed = entry["speedup"]
            row += [f"{entry[compare]['decode_tok_s']['median']:.1f}", f"{speed['decode_tok_s']:.2f}",
                    f"{speed['ttft_s']:.2f}" if "ttft_s" in speed else "-",
                    {True: "yes", False: "no"}.get(entry.get("tokens_match"), "-")]
        table.add_row(*row)
    console.print(table)
    kv = data["kv_cache"]
    console.print(f"peak RSS {format_bytes(data['peak_rss_bytes'])}"
                  + (f", peak GPU {format_bytes(data['peak_gpu_bytes'])}" if data["peak_gpu_bytes"] else "")
                  + f"; KV waste at most {kv['max_wasted_slots_per_seq']} slots per sequence "
                  f"(block {kv['block_size']})", highlight=False)


# --- chat (llmrun.chat) ---


class _MarkdownTail:
    """A growing text as Markdown, cut to the last lines that fit the terminal while it streams
    (a Live region taller than the screen would leave stale copies in the scrollback)."""

    def __init__(self) -> None:
        self.text = ""

    def __rich_console__(self, console, options):
        from rich.markdown import Markdown
        from rich.segment import Segment

        # No height: render_lines would pad to it, and crop the top rather than keep the tail.
        lines = console.render_lines(Markdown(self.text), options.update(height=None), pad=False)
        for line in lines[-max(1, console.size.height - 2):]:
            yield from line
            yield Segment.line()


class ReplyView:
    """One reply (run or chat) on stdout: live Markdown on a TTY (its tail while it grows, then all of it,
    so code blocks and lists render right); plain text otherwise."""

    def __init__(self, live: bool):
        self.text = ""
        self._live = None
        if live:
            from rich.console import Console
            from rich.live import Live

            self._console = Console()
            self._tail = _MarkdownTail()
            self._live = Live(self._tail, console=self._console, refresh_per_second=12, transient=True)

    def __enter__(self) -> "ReplyView":
        if self._live is not None:
            self._live.start()
        return self

    def write(self, delta: str) -> None:
        if not delta:
            return
        self.text += delta
        if self._live is not None:
            self._tail.text = self.text  # the Live thread re-renders it
        else:
            sys.stdout.write(delta)
            sys.stdout.flush()

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and not self.text and self._live is None:
            return  # nothing was shown: an error before the first token leaves stdout empty
        if self._live is not None:
            from rich.markdown import Markdown

            self._live.stop()
            if self.text.strip():
                self._console.print(Markdown(self.text))
        elif not self.text.endswith("\n"):  # every reply ends a line, even an empty one
            sys.stdout.write("\n")
            sys.stdout.flush()


def chat_line(message: str, style: str = "dim") -> None:
    """A line for the person at the terminal (stderr): styled on a TTY, plain otherwise."""
    if stderr_is_tty():
        from rich.console import Console

        Console(stderr=True).print(message, style=style, highlight=False, markup=False)
    else:
        print(message, file=sys.stderr, flush=True)


def chat_warning(message: str) -> None:
    chat_line(f"llmrun: {message}", style="yellow")


def chat_error(message: str) -> None:
    chat_line(f"llmrun: error: {message}", style="red")


def chat_rows(rows: list[tuple[str, str]]) -> None:
    """Two columns (name, value) on stderr, for /help, /set and /stats."""
    if not stderr_is_tty():
        width = max((len(name) for name, _ in rows), default=0)
        for name, value in rows:
            print(f"  {name.ljust(width)}  {value}", file=sys.stderr)
        sys.stderr.flush()
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for name, value in rows:
        table.add_row(Text(name), Text(value))  # no markup: values may hold [brackets]
    Console(stderr=True).print(table, highlight=False)
