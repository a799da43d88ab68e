"""The run command's input and output: the prompt from stdin and arguments, streamed text, JSON, JSON Lines."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

from llmrun.errors import LlmrunError, UsageError


def join_prompt(piped: str, argument: str, *, raw: bool) -> str:
    """The piped text (stdin, or one --each-line line), a blank line, then the PROMPT argument.

    Either alone is fine; a part holding only whitespace counts as absent ("" when both do). For
    the chat template each part loses its leading and trailing newlines; --raw keeps both texts
    exactly and adds only the line breaks that leave one blank line after the piped text.
    """
    parts = [part for part in (piped, argument) if part.strip()]
    if not raw:
        return "\n\n".join(part.strip("\n") for part in parts)
    if len(parts) < 2:
        return "".join(parts)
    return piped + ("\n" if piped.endswith("\n") else "\n\n") + argument


def read_prompt(prompt: Optional[str], *, raw: bool = False) -> str:
    """stdin (when it is not a TTY) goes before the PROMPT argument, a blank line between."""
    piped = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    text = join_prompt(piped, prompt or "", raw=raw)
    if not text:
        raise UsageError("no prompt: give one as an argument or pipe text on stdin")
    return text


def memory_json(engine) -> dict:
    from llmrun.plan.devices import peak_rss_bytes
    from llmrun.plan.tiers import Tier

    placement = engine.plan.placement
    return {"rss_before_weights_bytes": engine.rss_before_weights_bytes, "peak_rss_bytes": peak_rss_bytes(),
            "cpu_plan_bytes": placement.total_bytes(Tier.CPU), "cpu_budget_bytes": placement.budgets.cpu_bytes,
            "layer_tiers": [t.value for t in placement.layer_tiers], "disk_reads": engine.weights.disk_reads}


@dataclass(frozen=True)
class InputLine:
    """One --each-line prompt: its 0-based line number in the input, the line, the text to send."""

    index: int
    line: str
    text: str


def read_lines(prompt: Optional[str], *, raw: bool = False) -> list[InputLine]:
    """Every non-blank stdin line, joined with the PROMPT argument as read_prompt joins stdin;
    blank lines are skipped but counted, so `index` stays the line's number in the input."""
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("--each-line reads prompts from stdin: pipe them in, one per line")
    lines = [InputLine(index, line, join_prompt(line, prompt or "", raw=raw))
             for index, line in enumerate(_without_line_end(text) for text in sys.stdin) if line.strip()]
    if not lines:
        raise UsageError("no prompt: stdin has no non-empty lines")
    return lines


def _without_line_end(line: str) -> str:
    """The line without its terminator (\\n or \\r\\n); any other character is the prompt's."""
    return line[:-2] if line.endswith("\r\n") else line[:-1] if line.endswith("\n") else line


def generate_lines(opened, lines: list[InputLine], ids: list[list[int]], params) -> None:
    """JSON Lines in input order. Every prompt joins the engine's running batch as soon as a place
    frees up (at most the planned --batch decode together), and a row is printed once it and every
    row before it are done. A prompt the engine refuses (longer than the context, empty) gets an
    error row and the others go on; the run then ends with an error naming the refused lines."""
    engine = opened.engine
    rows: list[tuple[InputLine, int | str]] = []  # (line, its request's index or its error)
    accepted: list[list[int]] = []
    for line, line_ids in zip(lines, ids):
        try:
            engine.check_prompt(line_ids)
            rows.append((line, len(accepted)))
            accepted.append(line_ids)
        except LlmrunError as err:
            rows.append((line, str(err)))
    generation = engine.generate(accepted, params)
    printed = 0
    with generation:
        for event in generation:
            if event.finish_reason is not None:
                printed = _print_done_rows(rows, printed, generation.results)
    _print_done_rows(rows, printed, generation.results)
    refused = [line.index for line, outcome in rows if isinstance(outcome, str)]
    if refused:
        shown = ", ".join(map(str, refused[:10])) + (", ..." if len(refused) > 10 else "")
        raise UsageError(f"{len(refused)} of {len(lines)} prompt lines failed (see their \"error\" rows): "
                         f"index {shown}")


def _print_done_rows(rows, first: int, results) -> int:
    """Print rows from `first` on while they are done; returns the first row not printed."""
    for number in range(first, len(rows)):
        line, outcome = rows[number]
        row = {"index": line.index, "prompt": line.line}
        if isinstance(outcome, str):
            row["error"] = outcome
        elif results[outcome].finish_reason is None:
            return number
        else:
            result = results[outcome]
            row.update(text=result.text, finish_reason=result.finish_reason.value, tokens=result.tokens,
                       prompt_tokens=result.prompt_tokens)
        print(json.dumps(row), flush=True)
    return len(rows)


def generate_one(opened, ids, params, *, as_json: bool, quiet: bool) -> None:
    from contextlib import nullcontext

    from llmrun.display import ReplyView, print_stats
    from llmrun.interrupt import StopOnInterrupt, keys_not_echoed
    from llmrun.plan.make import record_run

    engine = opened.engine
    engine.check_prompt(ids)  # fail before anything is written to stdout
    generation = engine.generate([ids], params)
    if as_json:
        generation.run_to_end()
    else:
        live = sys.stdout.isatty()
        # As in chat: on a terminal Ctrl-C stops the reply after the current token, and ^C is not
        # echoed into the live view (the echo moves its cursor, so the final redraw lands a row off).
        quiet_keys = keys_not_echoed() if live else nullcontext()
        stop = StopOnInterrupt() if live else nullcontext(lambda: False)
        with quiet_keys, stop as should_stop, ReplyView(live=live) as out:
            with generation:
                for event in generation:
                    out.write(event.text)
                    if should_stop():
                        break
        if should_stop():
            raise KeyboardInterrupt  # after the final render: "llmrun: interrupted", status 130
    result = generation.results[0]
    record_run(engine.plan, result.decode_tok_s, len(result.tokens))  # the next plan's estimate learns
    if as_json:
        print(json.dumps({
            "model": opened.name, "dtype": engine.plan.dtype, "text": result.text, "tokens": result.tokens,
            "prompt_tokens": result.prompt_tokens, "generated_tokens": len(result.tokens),
            "ttft_s": round(result.ttft_s, 4), "decode_tok_s": round(result.decode_tok_s, 2),
            "decode_read_bytes_s": round(result.decode_tok_s * engine.plan.estimate.read_bytes_per_token),
            "finish_reason": result.finish_reason.value,
            "memory": memory_json(engine),
        }))
    elif not quiet:
        print_stats(
            f"{result.prompt_tokens} prompt tokens, {len(result.tokens)} generated "
            f"({result.finish_reason.value}), first token {result.ttft_s:.2f} s, "
            f"{result.decode_tok_s:.1f} tok/s"
        )
