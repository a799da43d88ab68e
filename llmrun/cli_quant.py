"""The compressed-weights commands: quantize (a store model) and perplexity (its quality), registered by cli.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from llmrun.cli_options import (
    CpuMem, Ctx, Dtype, GpuMem, ModelArg, Quant, checked, engine_options, flag, json_option,
)


def known_target(value: str) -> str:
    """A Typer callback: --to takes int8 or int4."""
    if value not in ("int8", "int4"):
        raise typer.BadParameter(f"unknown quantization {value!r}; choose int8 or int4")
    return value


def quantize_command(
    model: ModelArg,
    to: Annotated[str, typer.Option("--to", help="int4 (asymmetric groups) or int8 (symmetric).", metavar="KIND",
                                    callback=known_target)] = "int4",
    group: Annotated[Optional[int], typer.Option(
        "--group", help="Inputs per scale: int4 32, 64 or 128 (default 32); int8 a multiple of 16, "
                        "or 0 for one scale per output channel (the default).", metavar="N")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Name in llmrun's store (default: MODEL-int4-g32).",
                                                metavar="NAME")] = None,
    force: Annotated[bool, flag("--force", help="Replace a store entry of that name.")] = False,
    calibrate: Annotated[Optional[Path], typer.Option(
        "--calibrate", help="int4: run this UTF-8 text through the float model first and round each weight "
                            "more closely where its input is large (a slower quantize, a closer model; "
                            "docs/quantization.md).", metavar="FILE", show_default=False)] = None,
) -> None:
    """Write a copy of MODEL with its layers' matmul weights (and output head) compressed into llmrun's store.

    Example: llmrun quantize smollm2 --to int4 --group 64 --name smollm2-int4 --calibrate notes.txt
    """
    from llmrun import display
    from llmrun.bench.perplexity import read_text
    from llmrun.quant.spec import QuantSpec
    from llmrun.quant.store_model import quantize_to_store
    from llmrun.sizes import format_bytes

    spec = QuantSpec.parse(to, group)
    text = None
    if calibrate is not None:
        text = (calibrate.name, read_text(calibrate, "--calibrate needs a text to run"))
    with display.count_progress(f"calibrating on {text and text[0]}", "tokens", enabled=text is not None) as on_token, \
            display.count_progress(f"quantizing {model} to {spec.label}", "tensors") as on_tensor:
        made = quantize_to_store(model, spec, name, force, on_tensor, text, on_token)
    print(f"{made.name}: {made.description}, "
          f"{format_bytes(made.size_bytes)} (from {format_bytes(made.source_bytes)}); ready at {made.path}",
          file=sys.stderr)


def perplexity_command(
    model: ModelArg,
    file: Annotated[Path, typer.Argument(help="A UTF-8 text to score (e.g. data/perplexity-english.txt).",
                                         metavar="FILE", show_default=False)],
    quant: Quant = "none",
    dtype: Dtype = "auto",
    ctx: Ctx = None,
    gpu_mem: GpuMem = None,
    cpu_mem: CpuMem = None,
    chunk: Annotated[Optional[int], typer.Option(
        "--chunk", help="Tokens a forward, 1 to 512 (default 512: the path prompts take); 16 or fewer run "
                        "the kernels of decode steps (1: a generated token's path, slower).",
        callback=checked("chunk"), metavar="N", show_default=False)] = None,
    as_json: Annotated[bool, json_option("Print one JSON object.")] = False,
) -> None:
    """Perplexity of MODEL on FILE, every token scored teacher-forced (lower is better).

    Example: llmrun perplexity smollm2 data/perplexity-english.txt --quant int4
    """
    from llmrun.bench.perplexity import CHUNK_TOKENS, perplexity, read_text
    from llmrun.runtime import open_model

    text = read_text(file)
    chunk = chunk or CHUNK_TOKENS
    opened = open_model(model, engine_options(gpu_mem, cpu_mem, ctx, 1, dtype, quant), show_progress=not as_json)
    with opened.engine:
        ids = opened.tokenizer.encode(text, add_special_tokens=False)
        result = perplexity(opened.engine, ids, chunk)
        quant = opened.engine.weights.quant.meta
        weights = quant.describe() if quant.tensors else "float"
    data = {"model": opened.name, "file": str(file), "dtype": opened.engine.plan.dtype, "weights": weights,
            "chunk": chunk, "num_forwards": result.num_forwards, "num_tokens": result.num_tokens,
            "num_scored": result.num_scored,
            "mean_nll": round(result.mean_nll, 6), "perplexity": round(result.perplexity, 4)}
    if as_json:
        print(json.dumps(data))
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.num_scored} tokens "
              f"({opened.name}, {data['dtype']}, weights: {weights})")


def quant_commands() -> dict[str, Callable]:
    """Command name -> function, in the order `llmrun --help` lists them."""
    return {"quantize": quantize_command, "perplexity": perplexity_command}
