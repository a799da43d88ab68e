"""Every command-line option and argument declared once, with its check: the commands in cli*.py
share these `Annotated` types, so an option reads and refuses values the same way everywhere; and the
helpers every command uses to turn them into engine options and a model name."""

from __future__ import annotations

from typing import Annotated, Callable, List, Optional

import typer

from llmrun.options import problem

MODEL_HELP = "Model: alias (smollm2, phi-3-mini), Hub repo id, local folder or .gguf file."
DEFAULT_MODEL_HELP = MODEL_HELP + " Default: $LLMRUN_MODEL or smollm2."


def checked(key: str) -> Callable:
    """A Typer callback that refuses a value outside llmrun.options.RULES[key] as a usage error
    (exit 2, Typer's one-line message naming the option)."""

    def callback(value):
        wrong = problem(key, value)
        if wrong:
            raise typer.BadParameter(wrong)
        return value

    return callback


def size_in_bytes(value: Optional[str]) -> Optional[int]:
    """A Typer callback: a size such as 6GB read into bytes (None stays None: "measure it")."""
    from llmrun.errors import UsageError
    from llmrun.sizes import parse_size

    try:
        return None if value is None else parse_size(value)
    except UsageError as err:
        raise typer.BadParameter(str(err)) from None


def known_dtype(value: str) -> str:
    """A Typer callback: one of the dtype names --dtype takes."""
    from llmrun.plan.policy import DTYPES

    if value not in DTYPES:
        raise typer.BadParameter(f"unknown dtype {value!r}; choose one of: {', '.join(DTYPES)}")
    return value


def known_quant(value: str) -> str:
    """A Typer callback: one of the compressions --quant takes (none, int8, int4)."""
    from llmrun.quant.spec import QUANT_CHOICES

    if value not in QUANT_CHOICES:
        raise typer.BadParameter(f"unknown quantization {value!r}; choose one of: {', '.join(QUANT_CHOICES)}")
    return value


def flag(*names: str, help: str):
    """A boolean switch shown without a value (`--json`, not `--json <bool>`)."""
    return typer.Option(*names, help=help, metavar="")


# Arguments
ModelArg = Annotated[str, typer.Argument(help=MODEL_HELP, metavar="MODEL", show_default=False)]
DefaultModelArg = Annotated[Optional[str], typer.Argument(help=DEFAULT_MODEL_HELP, metavar="MODEL",
                                                          show_default=False)]

# Sampling (run, chat)
Temperature = Annotated[float, typer.Option("-t", "--temperature", help="0 = greedy (deterministic); >= 0.",
                                            callback=checked("temperature"), metavar="T")]
TopK = Annotated[int, typer.Option("--top-k", help="Sample from the k likeliest tokens (0 = off).",
                                   callback=checked("top_k"), metavar="K")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, 0 to 1 (1 = off).",
                                     callback=checked("top_p"), metavar="P")]
MinP = Annotated[float, typer.Option("--min-p", help="Drop tokens below min-p x the top probability, 0 to 1 (0 = off).",
                                     callback=checked("min_p"), metavar="P")]
RepeatPenalty = Annotated[float, typer.Option("--repeat-penalty", help="Penalise repeated tokens, > 0 (1 = off).",
                                              callback=checked("repetition_penalty"), metavar="X")]
Seed = Annotated[Optional[int], typer.Option("--seed", help="Random seed, 0 to 2^64-1: same seed, same text.",
                                             callback=checked("seed"), metavar="N")]
Stop = Annotated[Optional[List[str]], typer.Option("--stop", help="Stop before this text (repeatable).",
                                                   metavar="TEXT")]
System = Annotated[Optional[str], typer.Option("--system", help="System message for the chat template.",
                                               metavar="TEXT")]


def max_tokens_option(help: str):
    return typer.Option("-n", "--max-tokens", help=help, callback=checked("max_new_tokens"), metavar="N")


# Placement and memory (run, chat, plan, bench)
Ctx = Annotated[Optional[int], typer.Option("--ctx", help="Context length in tokens (default: model max, at most 4096).",
                                            callback=checked("ctx"), metavar="N")]
Dtype = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16.", metavar="NAME",
                                    callback=known_dtype)]
Quant = Annotated[str, typer.Option(
    "--quant", help="Compress the layers' matmul weights (and the output head, to int8) on load, cached: "
                    "none, int8 or int4 (groups of 32).",
    metavar="KIND", callback=known_quant)]
# The sizes arrive in the command as bytes (int), read by the callback.
GpuMem = Annotated[Optional[str], typer.Option(
    "--gpu-mem", help="Plan as if only this much GPU memory were free (6GB, 6GiB, 0 = no GPU).", metavar="SIZE",
    callback=size_in_bytes)]
CpuMem = Annotated[Optional[str], typer.Option(
    "--cpu-mem", help="Plan as if only this much RAM were free (16GB, 512MB).", metavar="SIZE",
    callback=size_in_bytes)]


def batch_option(help: str):
    return typer.Option("--batch", help=help, callback=checked("batch"), metavar="N")


def json_option(help: str):
    return flag("--json", help=help)


Quiet = Annotated[bool, flag("-q", "--quiet", help="No stats line on stderr.")]

# The server (serve) and talking to one (run --url)
Host = Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface; give an "
                                   "--api-key).", metavar="ADDR")]
Port = Annotated[int, typer.Option("--port", help="Port to listen on (0: one the system picks).",
                                   callback=checked("port"), metavar="N")]
ApiKey = Annotated[Optional[str], typer.Option("--api-key", help="Require Authorization: Bearer KEY on /v1 and /api "
                                               "(default: $LLMRUN_API_KEY).", metavar="KEY", show_default=False)]
MaxWaiting = Annotated[int, typer.Option("--max-waiting", help="Requests that may wait for a place in the batch "
                                         "(beyond: 429).", callback=checked("max_waiting"), metavar="N")]
ShutdownGrace = Annotated[float, typer.Option("--shutdown-grace", help="Seconds running requests may finish "
                                              "after Ctrl-C or SIGTERM, before they are cancelled.",
                                              callback=checked("shutdown_grace"), metavar="SECONDS")]
MaxBodySize = Annotated[str, typer.Option("--max-body-size", help="Largest request body accepted (beyond: 413).",
                                          callback=size_in_bytes, metavar="SIZE")]
Url = Annotated[Optional[str], typer.Option("--url", help="Send the prompt to a running `llmrun serve` "
                                            "(http://HOST:PORT) instead of loading the model.", metavar="URL")]

# The store (import, pull): what becomes of a GGUF's quantized weights
KeepQuant = Annotated[bool, typer.Option(
    "--keep-quant/--dequantize",
    help="Keep a GGUF's quantized weights (exact, in llmrun's int4/int8 format), or dequantize them to float32.")]


def engine_options(gpu_mem_bytes: Optional[int], cpu_mem_bytes: Optional[int], ctx: Optional[int], batch: int,
                   dtype: str, quant: str):
    """EngineOptions from options already checked where they are declared (sizes read into bytes)."""
    from llmrun.engine.build import EngineOptions

    return EngineOptions(gpu_mem_bytes=gpu_mem_bytes, cpu_mem_bytes=cpu_mem_bytes, ctx=ctx, batch=batch,
                         dtype=dtype, quant=quant)


def default_model(model: Optional[str]) -> str:
    """MODEL when given, else $LLMRUN_MODEL, else smollm2."""
    from llmrun import settings

    return model or settings.LLMRUN_MODEL.text() or "smollm2"
