"""The Typer app: thin commands that call into llmrun and map LlmrunError to a message + exit code."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from llmrun.cli_options import (
    Ctx, CpuMem, DefaultModelArg, Dtype, GpuMem, MinP, ModelArg, Quant, Quiet, RepeatPenalty, Seed, Stop, System,
    Temperature, TopK, TopP, Url, batch_option, checked, default_model, engine_options, flag, json_option,
    max_tokens_option,
)
from llmrun.cli_quant import quant_commands
from llmrun.cli_serve import serve_commands
from llmrun.cli_store import store_commands
from llmrun.errors import LlmrunError
from llmrun.streams import end_quietly, exit_now, fail, flush_std_streams, lenient_stdin

class _Commands(TyperGroup):
    """llmrun's command group: a command's own failures end here as one line on stderr (Typer's
    standalone run, around it, reports usage errors before a command starts)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LlmrunError as err:
            fail(err)
        except KeyboardInterrupt:
            print("llmrun: interrupted", file=sys.stderr)
            sys.exit(130)
        except BrokenPipeError:
            end_quietly()


app = typer.Typer(
    name="llmrun",
    cls=_Commands,
    rich_markup_mode=None,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        from llmrun import __version__

        print(f"llmrun {__version__}")
        raise typer.Exit()


@app.callback()
def _app_options(
    version: Annotated[bool, typer.Option("--version", help="Print llmrun's version and exit.", metavar="",
                                          callback=_show_version, is_eager=True)] = False,
) -> None:
    """Run large language models locally and offline, on whatever hardware you have."""


def _report(data: dict, as_json: bool, render) -> None:
    """A report as indented JSON, or through its display renderer."""
    if as_json:
        import json

        print(json.dumps(data, indent=2))
        return
    render(data)


def _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens, stop):
    """SamplingParams from the options run and chat share (0 turns top-k and min-p off)."""
    from llmrun.engine.params import SamplingParams  # torch-free: run --url loads nothing

    return SamplingParams(
        temperature=temperature, top_k=top_k or None, top_p=top_p, min_p=min_p or None,
        repetition_penalty=repeat_penalty, seed=seed, max_new_tokens=max_tokens, stop=tuple(stop or ()),
    )


@app.command("run")
def run_command(
    model: ModelArg,
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt (stdin, when piped, comes first).",
                                                    metavar="PROMPT", show_default=False)] = None,
    max_tokens: Annotated[int, max_tokens_option("Most tokens to generate.")] = 512,
    temperature: Temperature = 0.7,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    system: System = None,
    raw: Annotated[bool, flag("--raw", help="Skip the chat template; tokenize the prompt as is.")] = False,
    ctx: Ctx = None,
    dtype: Dtype = "auto",
    quant: Quant = "none",
    gpu_mem: GpuMem = None,
    cpu_mem: CpuMem = None,
    batch: Annotated[int, batch_option("Prompts decoded together (with --each-line).")] = 1,
    each_line: Annotated[bool, flag("--each-line", help="Every stdin line is its own prompt; JSON Lines out.")] = False,
    as_json: Annotated[bool, json_option("Print one JSON object instead of streamed text.")] = False,
    quiet: Quiet = False,
    url: Url = None,
) -> None:
    """Answer one prompt and exit; only the model's text goes to stdout.

    Example: echo "Some text" | llmrun run smollm2 "Summarise this." -t 0
    """
    params = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens, stop)
    if url is not None:  # a running server answers: nothing loads here
        from llmrun.oneshot import read_prompt
        from llmrun.serve.client import refuse_local_options, run_remote

        refuse_local_options({"--each-line": each_line, "--ctx": ctx is not None, "--dtype": dtype != "auto",
                              "--gpu-mem": gpu_mem is not None, "--cpu-mem": cpu_mem is not None,
                              "--batch": batch != 1, "--quant": quant != "none"})
        run_remote(url, model, read_prompt(prompt, raw=raw), params, system=system, raw=raw, as_json=as_json,
                   quiet=quiet)
        return
    _run_here(model, prompt, params, engine_options(gpu_mem, cpu_mem, ctx, batch, dtype, quant), system=system,
              raw=raw, each_line=each_line, as_json=as_json, quiet=quiet)


def _run_here(model: str, prompt: Optional[str], params, request, *, system: Optional[str], raw: bool,
              each_line: bool, as_json: bool, quiet: bool) -> None:
    """`run` on this machine: the prompt (or --each-line's lines) through a model loaded here."""
    from dataclasses import replace

    from llmrun.engine.prompt import prompt_ids
    from llmrun.oneshot import generate_lines, generate_one, read_lines, read_prompt
    from llmrun.runtime import open_model

    lines = read_lines(prompt, raw=raw) if each_line else []
    texts = [line.text for line in lines] if each_line else [read_prompt(prompt, raw=raw)]
    # KV memory for the prompts decoded together: --batch at most, never more prompts than were read
    request = replace(request, batch=min(request.batch, len(texts)))
    opened = open_model(model, request, show_progress=not (as_json or each_line))
    with opened.engine:
        ids = [prompt_ids(opened.tokenizer, text, system=system, raw=raw) for text in texts]
        if each_line:
            generate_lines(opened, lines, ids, params)
        else:
            generate_one(opened, ids[0], params, as_json=as_json, quiet=quiet)


@app.command("chat")
def chat_command(
    model: DefaultModelArg = None,
    max_tokens: Annotated[int, max_tokens_option("Most tokens per reply.")] = 512,
    temperature: Temperature = 0.7,
    top_k: TopK = 40,
    top_p: TopP = 0.95,
    min_p: MinP = 0.05,
    repeat_penalty: RepeatPenalty = 1.0,
    seed: Seed = None,
    stop: Stop = None,
    system: System = None,
    ctx: Ctx = None,
    dtype: Dtype = "auto",
    quant: Quant = "none",
    gpu_mem: GpuMem = None,
    cpu_mem: CpuMem = None,
    quiet: Quiet = False,
) -> None:
    """Talk with a model; the conversation stays in the KV cache, so each turn prefills only what is new.

    /help lists the commands (/set, /system, /save, /load, /reset, /stats, /exit). Piped, each
    stdin line is one turn and stdout holds only the replies, separated by blank lines.

    Example: llmrun chat smollm2 --system "Answer briefly." -t 0.2
    """
    from llmrun.chat.repl import run_chat
    from llmrun.runtime import open_model

    request = engine_options(gpu_mem, cpu_mem, ctx, 1, dtype, quant)
    params = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed, max_tokens, stop)
    opened = open_model(default_model(model), request)
    with opened.engine:
        status = run_chat(opened, params, system=system, quiet=quiet)
    if status:  # piped input with a refused line: each was reported as it came
        raise typer.Exit(status)


@app.command("plan")
def plan_command(
    model: DefaultModelArg = None,
    gpu_mem: GpuMem = None,
    cpu_mem: CpuMem = None,
    ctx: Ctx = None,
    batch: Annotated[int, batch_option("Sequences decoded together.")] = 1,
    dtype: Dtype = "auto",
    quant: Quant = "none",
    as_json: Annotated[bool, json_option("Print the plan as JSON (schema: docs/plan-json.md).")] = False,
) -> None:
    """Show where every layer would live (GPU, pinned CPU, disk) before loading anything.

    Example: llmrun plan phi-3-mini --gpu-mem 6GB --ctx 4096
    """
    from llmrun.plan.inputs import plan_inputs
    from llmrun.plan.make import make_plan
    from llmrun.plan.schema import plan_to_json

    request = engine_options(gpu_mem, cpu_mem, ctx, batch, dtype, quant)
    inputs = plan_inputs(default_model(model))
    report = make_plan(inputs.config, inputs.index, request, inputs.folder)
    data = plan_to_json(report, inputs.name, str(inputs.folder or inputs.name), inputs.architecture)
    from llmrun.display import render_plan

    _report(data, as_json, render_plan)


@app.command("bench")
def bench_command(
    model: DefaultModelArg = None,
    compare: Annotated[str, typer.Option("--compare", help="Also run: transformers (or accelerate, for offload), "
                                         "or llama.cpp on the model's GGUF (extra [llamacpp]).",
                                         metavar="NAME")] = "none",
    batch: Annotated[int, batch_option("Sequences in the batched case.")] = 8,
    new_tokens: Annotated[Optional[int], typer.Option("--new-tokens", help="Tokens generated per sequence "
                                                      "(default 128; 16 with --quick).",
                                                      callback=checked("new_tokens"), metavar="N")] = None,
    reps: Annotated[int, typer.Option("--reps", help="Timed repetitions per case (after one warm-up).",
                                      callback=checked("reps"), metavar="N")] = 3,
    quick: Annotated[bool, flag("--quick", help="A small workload (64-token prompts, 16 new tokens unless --new-tokens).")] = False,
    dtype: Dtype = "auto",
    quant: Quant = "none",
    ctx: Ctx = None,
    gpu_mem: GpuMem = None,
    cpu_mem: CpuMem = None,
    as_json: Annotated[bool, json_option("Print the report as JSON.")] = False,
) -> None:
    """Measure prefill and decode speed on a fixed workload (docs/performance.md).

    Example: llmrun bench smollm2 --compare transformers --json
    """
    from llmrun.bench.run import check_bench_args, run_bench
    from llmrun.bench.workload import bench_cases

    compare = check_bench_args(compare, batch, new_tokens, reps)
    request = engine_options(gpu_mem, cpu_mem, ctx, batch, dtype, quant)
    cases = bench_cases(quick, batch, new_tokens)
    data = run_bench(default_model(model), request, cases, reps, compare)
    from llmrun.display import render_bench

    _report(data, as_json, render_bench)


for _name, _command in {**serve_commands(), **store_commands(), **quant_commands()}.items():
    app.command(_name)(_command)


def main() -> None:
    """Console-script entry point. Typer's standalone run handles usage errors itself (its one-line
    message and usage hint, exit 2); a command's own failures are turned into one line by
    `_Commands.invoke`; the standard streams' handling is in streams.py."""
    lenient_stdin()
    try:
        app(prog_name="llmrun")
    except LlmrunError as err:  # raised outside a command (in a callback that runs before it)
        fail(err)
    except SystemExit as done:
        if isinstance(done.__context__, BrokenPipeError):  # Rich and Typer end a closed pipe with status 1
            end_quietly()
        raise
    finally:
        flush_std_streams()  # now, not at interpreter exit, where a closed pipe means status 120


def entry() -> None:
    """The `llmrun` console script and `python -m llmrun`: main(), then the process ends at once with
    its status (streams.exit_now: no interpreter teardown). main() itself raises SystemExit, for
    callers in the same process."""
    try:
        main()
    except SystemExit as done:
        exit_now(done.code)
    exit_now(0)
