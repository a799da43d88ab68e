"""The run command's input and output: the prompt from stdin and arguments, streamed text, JSON, JSON Lines."""

from __future__ import annotations

import json
import sys
from typing import Optional

from llmrun.errors import UsageError


def read_prompt(prompt: Optional[str]) -> str:
    """stdin (when it is not a TTY) goes before the PROMPT argument, a blank line between."""
    piped = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    parts = [p for p in (piped.strip("\n"), (prompt or "").strip("\n")) if p.strip()]
    if not parts:
        raise UsageError("no prompt: give one as an argument or pipe text on stdin")
    return "\n\n".join(parts)


def memory_json(engine) -> dict:
    from llmrun.engine.build import peak_rss_bytes
    from llmrun.plan.placement import Tier

    placement = engine.plan.placement
    return {"rss_before_weights_bytes": engine.rss_before_weights_bytes, "peak_rss_bytes": peak_rss_bytes(),
            "cpu_plan_bytes": placement.total_bytes(Tier.CPU), "cpu_budget_bytes": placement.budgets.cpu_bytes,
            "layer_tiers": [t.value for t in placement.layer_tiers]}


def read_lines() -> list[str]:
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("--each-line reads prompts from stdin: pipe them in, one per line")
    lines = [line.rstrip("\r\n") for line in sys.stdin]
    if not any(line.strip() for line in lines):
        raise UsageError("no prompt: stdin has no non-empty lines")
    return [line for line in lines if line.strip()]


def generate_lines(opened, prompts, ids, params, batch: int) -> None:
    """JSON Lines in input order; prompts decoded together `batch` at a time."""
    engine = opened.engine
    for first in range(0, len(prompts), batch):
        for _ in engine.generate(ids[first : first + batch], params):
            pass
        for offset, result in enumerate(engine.results):
            print(json.dumps({"index": first + offset, "prompt": prompts[first + offset], "text": result.text,
                              "finish_reason": result.finish_reason.value, "tokens": result.tokens}),
                  flush=True)


def generate_one(opened, ids, params, *, as_json: bool, quiet: bool) -> None:
    from llmrun.display import ReplyView, print_stats

    engine = opened.engine
    engine.check_prompt(ids)  # fail before anything is written to stdout
    if as_json:
        for _ in engine.generate([ids], params):
            pass
    else:
        with ReplyView(live=sys.stdout.isatty()) as out:
            for event in engine.generate([ids], params):
                out.write(event.text)
    result = engine.results[0]
    if as_json:
        print(json.dumps({
            "model": opened.name, "dtype": engine.plan.dtype, "text": result.text, "tokens": result.tokens,
            "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.tokens),
            "ttft_s": round(result.ttft_s, 4), "decode_tok_s": round(result.decode_tok_s, 2),
            "finish_reason": result.finish_reason.value,
            "memory": memory_json(engine),
        }))
    elif not quiet:
        print_stats(
            f"{result.prompt_tokens} prompt tokens, {len(result.tokens)} generated "
            f"({result.finish_reason.value}), first token {result.ttft_s:.2f} s, "
            f"{result.decode_tok_s:.1f} tok/s"
        )
