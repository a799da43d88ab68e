"""The Typer app: thin commands that call into llmrun and map LlmrunError to a message + exit code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from llmrun.errors import LlmrunError

app = typer.Typer(
    name="llmrun",
    help="Run large language models locally and offline, on whatever hardware you have.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.command("pull")
def pull_command(
    name: str = typer.Argument(..., help="Alias (smollm2, phi-3-mini, ...) or Hub repo id (org/name)."),
) -> None:
    """Download a model (config, tokenizer, safetensors) into the local cache.

    Example: llmrun pull smollm2
    """
    from llmrun.hub.pull import pull_model

    source = pull_model(name)
    print(f"{source.name}: ready at {source.path}", file=sys.stderr)


@app.command("import")
def import_command(
    file: Path = typer.Argument(..., help="A .gguf file to convert."),
    name: Optional[str] = typer.Option(None, "--name", help="Name in llmrun's store (default: file name)."),
) -> None:
    """Convert a GGUF file into safetensors + config + tokenizer in llmrun's store.

    Example: llmrun import ./SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2
    """
    from llmrun.hub.gguf_import import import_gguf

    source = import_gguf(file, name)
    print(f"imported {source.name} into {source.path}", file=sys.stderr)


@app.command("models")
def models_command(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List local models: llmrun's store and the Hugging Face cache.

    Example: llmrun models --json
    """
    import json

    from llmrun.hub.listing import list_local_models

    models = list_local_models()
    if as_json:
        print(json.dumps([m.to_json() for m in models], indent=2))
        return
    from llmrun.display import render_models

    render_models(models)


def main() -> None:
    """Console-script entry point: run the app, turning LlmrunError into one line and exit 1."""
    try:
        app(standalone_mode=False)
    except LlmrunError as err:
        print(f"llmrun: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("llmrun: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        _silence_broken_pipe()
    except typer.Exit as done:
        sys.exit(done.exit_code)
    except typer.Abort:
        print("llmrun: aborted", file=sys.stderr)
        sys.exit(1)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


def _silence_broken_pipe() -> None:
    """The reader went away (`| head`): end quietly, without a second error at interpreter exit."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    sys.exit(0)
