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

def _plan_request(gpu_mem: Optional[str], cpu_mem: Optional[str], ctx: Optional[int], batch: int, dtype: str):
    from llmrun.engine.build import EngineOptions, dtype_name
    from llmrun.sizes import parse_size

    dtype_name(dtype, "cpu") if dtype != "auto" else None  # unknown names fail before any work
    return EngineOptions(
        gpu_mem_bytes=parse_size(gpu_mem) if gpu_mem is not None else None,
        cpu_mem_bytes=parse_size(cpu_mem) if cpu_mem is not None else None,
        ctx=ctx, batch=batch, dtype=dtype,
    )


def _default_model(model: Optional[str]) -> str:
    """MODEL when given, else $LLMRUN_MODEL, else smollm2."""
    import os

    return model or os.environ.get("LLMRUN_MODEL") or "smollm2"


def _report(data: dict, as_json: bool, renderer: str) -> None:
    """A report as indented JSON, or through the named display renderer."""
    if as_json:
        import json

        print(json.dumps(data, indent=2))
        return
    from llmrun import display

    getattr(display, renderer)(data)


def _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens, stop):
    """SamplingParams from the options run and chat share (0 turns top-k and min-p off)."""
    from llmrun.engine.sampler import SamplingParams

    return SamplingParams(
        temperature=temperature, top_k=top_k or None, top_p=top_p, min_p=min_p or None,
        repetition_penalty=repeat_penalty, seed=seed, max_new_tokens=max_tokens, stop=tuple(stop or ()),
    )


GPU_MEM_HELP = "Plan as if only this much GPU memory were free (6GB, 6GiB, 0 = no GPU)."
CPU_MEM_HELP = "Plan as if only this much RAM were free (16GB, 512MB)."

DEFAULT_MODEL_HELP = "Model: alias (smollm2, phi-3-mini), Hub repo id, local folder or .gguf file."


@app.command("run")
def run_command(
    model: str = typer.Argument(..., help=DEFAULT_MODEL_HELP),
    prompt: Optional[str] = typer.Argument(None, help="The prompt (stdin, when piped, comes first)."),
    max_tokens: int = typer.Option(512, "-n", "--max-tokens", help="Most tokens to generate."),
    temperature: float = typer.Option(0.7, "-t", "--temperature", help="0 = greedy (deterministic)."),
    top_k: int = typer.Option(40, "--top-k", help="Sample from the k likeliest tokens (0 = off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (1 = off)."),
    min_p: float = typer.Option(0.05, "--min-p", help="Drop tokens below min-p x the top probability."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalise repeated tokens (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: same seed, same text."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop before this text (repeatable)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for the chat template."),
    raw: bool = typer.Option(False, "--raw", help="Skip the chat template; tokenize the prompt as is."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length in tokens (default: model max, at most 4096)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help=GPU_MEM_HELP),
    cpu_mem: Optional[str] = typer.Option(None, "--cpu-mem", help=CPU_MEM_HELP),
    batch: int = typer.Option(1, "--batch", help="Prompts decoded together (with --each-line)."),
    each_line: bool = typer.Option(False, "--each-line", help="Every stdin line is its own prompt; JSON Lines out."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streamed text."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No stats line on stderr."),
) -> None:
    """Answer one prompt and exit; only the model's text goes to stdout.

    Example: echo "Summarise:" | llmrun run smollm2 "What is the capital of France?" -t 0
    """
    from llmrun.engine.prompt import prompt_ids
    from llmrun.oneshot import generate_lines, generate_one, read_lines, read_prompt
    from llmrun.runtime import open_model

    request = _plan_request(gpu_mem, cpu_mem, ctx, batch, dtype)
    prompts = read_lines() if each_line else [read_prompt(prompt)]
    params = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens, stop)
    opened = open_model(model, request, show_progress=not (as_json or each_line))
    if each_line:
        ids = [prompt_ids(opened.tokenizer, line, system=system, raw=raw) for line in prompts]
        try:
            generate_lines(opened, prompts, ids, params, batch)
        except BrokenPipeError:
            _silence_broken_pipe()
        return
    ids = prompt_ids(opened.tokenizer, prompts[0], system=system, raw=raw)
    try:
        generate_one(opened, ids, params, as_json=as_json, quiet=quiet)
    except BrokenPipeError:
        _silence_broken_pipe()  # the reader went away (`| head`): that is a normal end


@app.command("chat")
def chat_command(
    model: Optional[str] = typer.Argument(None, help=DEFAULT_MODEL_HELP + " Default: $LLMRUN_MODEL or smollm2."),
    max_tokens: int = typer.Option(512, "-n", "--max-tokens", help="Most tokens per reply."),
    temperature: float = typer.Option(0.7, "-t", "--temperature", help="0 = greedy (deterministic)."),
    top_k: int = typer.Option(40, "--top-k", help="Sample from the k likeliest tokens (0 = off)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Nucleus sampling mass (1 = off)."),
    min_p: float = typer.Option(0.05, "--min-p", help="Drop tokens below min-p x the top probability."),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="Penalise repeated tokens (1 = off)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed: same seed, same replies."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop a reply before this text (repeatable)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message for the chat template."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context length in tokens (default: model max, at most 4096)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help=GPU_MEM_HELP),
    cpu_mem: Optional[str] = typer.Option(None, "--cpu-mem", help=CPU_MEM_HELP),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No stats line after each reply."),
) -> None:
    """Talk with a model; the conversation stays in the KV cache, so each turn prefills only what is new.

    /help lists the commands (/set, /system, /save, /load, /reset, /stats, /exit). Piped, each
    stdin line is one turn and stdout holds only the replies, separated by blank lines.

    Example: llmrun chat smollm2 --system "Answer briefly." -t 0.2
    """
    from llmrun.chat.repl import run_chat
    from llmrun.runtime import open_model

    request = _plan_request(gpu_mem, cpu_mem, ctx, 1, dtype)
    params = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens, stop)
    opened = open_model(_default_model(model), request)
    try:
        run_chat(opened, params, system=system, quiet=quiet)
    except BrokenPipeError:
        _silence_broken_pipe()


@app.command("plan")
def plan_command(
    model: Optional[str] = typer.Argument(None, help=DEFAULT_MODEL_HELP + " Default: $LLMRUN_MODEL or smollm2."),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help=GPU_MEM_HELP),
    cpu_mem: Optional[str] = typer.Option(None, "--cpu-mem", help=CPU_MEM_HELP),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context tokens per sequence (default: model max, at most 4096)."),
    batch: int = typer.Option(1, "--batch", help="Sequences decoded together."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON (schema: docs/plan-json.md)."),
) -> None:
    """Show where every layer would live (GPU, pinned CPU, disk) before loading anything.

    Example: llmrun plan phi-3-mini --gpu-mem 6GB --ctx 4096
    """
    from llmrun.plan.inputs import plan_inputs
    from llmrun.plan.make import make_plan
    from llmrun.plan.schema import plan_to_json

    request = _plan_request(gpu_mem, cpu_mem, ctx, batch, dtype)
    inputs = plan_inputs(_default_model(model))
    report = make_plan(inputs.config, inputs.index, request, inputs.folder)
    data = plan_to_json(report, inputs.name, str(inputs.folder or inputs.name), inputs.architecture)
    _report(data, as_json, "render_plan")


@app.command("bench")
def bench_command(
    model: Optional[str] = typer.Argument(None, help=DEFAULT_MODEL_HELP + " Default: $LLMRUN_MODEL or smollm2."),
    compare: str = typer.Option("none", "--compare", help="Also run: transformers (or accelerate, for offload)."),
    batch: int = typer.Option(8, "--batch", help="Sequences in the batched case."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Tokens generated per sequence."),
    reps: int = typer.Option(3, "--reps", help="Timed repetitions per case (after one warm-up)."),
    quick: bool = typer.Option(False, "--quick", help="A small workload (64-token prompts, 16 new tokens)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto, float32, bfloat16 or float16."),
    ctx: Optional[int] = typer.Option(None, "--ctx", help="Context tokens per sequence."),
    gpu_mem: Optional[str] = typer.Option(None, "--gpu-mem", help=GPU_MEM_HELP),
    cpu_mem: Optional[str] = typer.Option(None, "--cpu-mem", help=CPU_MEM_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Measure prefill and decode speed on a fixed workload (docs/performance.md).

    Example: llmrun bench smollm2 --compare transformers --json
    """
    from llmrun.bench.run import check_bench_args, run_bench
    from llmrun.bench.workload import default_cases, quick_cases

    compare = check_bench_args(compare, batch, new_tokens, reps)
    request = _plan_request(gpu_mem, cpu_mem, ctx, batch, dtype)
    cases = quick_cases(batch) if quick else default_cases(batch, new_tokens)
    data = run_bench(_default_model(model), request, cases, reps, compare)
    _report(data, as_json, "render_bench")


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
        exit_code = app(standalone_mode=False)
        if isinstance(exit_code, int) and exit_code:  # Typer turns Ctrl-C into Exit(130), returned here
            raise KeyboardInterrupt if exit_code == 130 else typer.Exit(exit_code)
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
