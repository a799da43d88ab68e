"""`llmrun serve`: the HTTP server's command (registered by cli.py)."""

from __future__ import annotations

from typing import Annotated, Callable

from llmrun.cli_options import (
    ApiKey, CpuMem, Ctx, DefaultModelArg, Dtype, GpuMem, Host, MaxBodySize, MaxWaiting, Port, Quant, ShutdownGrace,
    batch_option, default_model, engine_options,
)


def serve_command(
    model: DefaultModelArg = None,
    host: Host = "127.0.0.1",
    port: Port = 8000,
    api_key: ApiKey = None,
    max_waiting: MaxWaiting = 256,
    max_body_size: MaxBodySize = "4MB",
    shutdown_grace: ShutdownGrace = 5.0,
    batch: Annotated[int, batch_option("Sequences decoded together (the KV cache is planned for them).")] = 16,
    ctx: Ctx = None,
    dtype: Dtype = "auto",
    quant: Quant = "none",
    gpu_mem: GpuMem = None,
    cpu_mem: CpuMem = None,
) -> None:
    """Serve a model over HTTP: OpenAI's API under /v1 (completions, chat, streaming) and Ollama's /api.

    Ctrl-C or SIGTERM stops it (running requests get --shutdown-grace seconds). docs/serve.md has more.

    Example: llmrun serve smollm2 --port 8000   (then: curl http://127.0.0.1:8000/v1/models)
    """
    from llmrun import settings
    from llmrun.serve.app import ServeConfig
    from llmrun.serve.server import serve

    request = engine_options(gpu_mem, cpu_mem, ctx, batch, dtype, quant)
    config = ServeConfig(api_key=api_key or settings.LLMRUN_API_KEY.text(), max_body_bytes=max_body_size)
    serve(default_model(model), request, config, host=host, port=port, max_waiting=max_waiting,
          grace_s=shutdown_grace)


def serve_commands() -> dict[str, Callable]:
    """Command name -> function, in the order `llmrun --help` lists them."""
    return {"serve": serve_command}
