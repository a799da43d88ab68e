"""Rich renderers (progress, tables, live replies): the only package that uses Rich."""

from llmrun.display.progress import (
    SlowStepProgress, count_progress, download_progress, layer_progress, note, print_stats, progress_steps,
    stderr_is_tty,
)
from llmrun.display.reply import ReplyView, chat_error, chat_line, chat_rows, chat_warning
from llmrun.display.tables import format_count, render_bench, render_models, render_plan

__all__ = [
    "ReplyView", "SlowStepProgress", "chat_error", "chat_line", "chat_rows", "chat_warning", "download_progress",
    "count_progress", "format_count", "layer_progress", "note", "print_stats", "progress_steps", "render_bench",
    "render_models", "render_plan", "stderr_is_tty",
]
