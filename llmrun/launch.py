"""The `llmrun` console script and `python -m llmrun`: the garbage collector paused before anything
else is imported (startup.py), then the command line (cli.entry)."""

from llmrun.startup import pause_collection


def entry() -> None:
    pause_collection()
    from llmrun.cli import entry as run_command_line

    run_command_line()
