"""Rich tables on stdout: the model list, the plan, the benchmark report."""

from __future__ import annotations

import sys

from llmrun.display.progress import note


def format_count(count: int | None) -> str:
    """A parameter count for people: 134_515_008 -> "135M", 3_821_079_552 -> "3.8B"."""
    if count is None:
        return "?"
    for divisor, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= divisor:
            value = count / divisor
            return f"{value:.1f}{suffix}" if value < 10 else f"{value:.0f}{suffix}"
    return str(count)


def _stdout_console():
    """Rich on stdout: the terminal's width, and in a pipe no width at all (nothing is cut or
    wrapped at 80 columns, so `| grep` and files see whole lines)."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 1000)


def render_models(models) -> None:
    """The `llmrun models` table on stdout (LocalModel rows); a hint on stderr when there are none."""
    if not models:
        note("no local models yet; fetch a small one with `llmrun pull smollm2`, "
             "or convert a file with `llmrun import FILE.gguf`")
        return
    from rich.table import Table

    from llmrun.sizes import format_bytes

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column, justify in (("NAME", "left"), ("ARCHITECTURE", "left"), ("PARAMS", "right"),
                            ("DTYPE", "left"), ("SIZE", "right"), ("SOURCE", "left")):
        table.add_column(column, justify=justify, no_wrap=True,
                         overflow="fold" if column == "NAME" else "ellipsis")
    for model in models:
        table.add_row(model.name, model.architecture or "?", format_count(model.num_parameters),
                      model.dtype or "?", format_bytes(model.size_bytes), model.source)
    _stdout_console().print(table)


def render_plan(plan_json: dict) -> None:
    """The plan as Rich tables on stdout: tiers with layer ranges, reservations, totals, estimate."""
    from rich.table import Table

    from llmrun.plan.estimate import format_tok_s
    from llmrun.sizes import format_bytes

    console = _stdout_console()
    model = plan_json["model"]
    console.print(f"[bold]{model['name']}[/] ({model['architecture']}, {model['num_layers']} layers, "
                  f"{format_bytes(model['weight_bytes'])} in {plan_json['dtype']}) on "
                  f"[bold]{plan_json['compute'].upper()}[/]"
                  + (f" ({plan_json['gpu_name']})" if plan_json.get("gpu_name") else ""), highlight=False)
    table = Table(title="Placement", title_justify="left")
    for column in ("tier", "layers", "also holds", "weights", "reserved", "total", "budget"):
        table.add_column(column, justify="right" if column in ("weights", "reserved", "total", "budget") else "left")
    for tier, info in plan_json["tiers"].items():
        if not info["total_bytes"]:
            continue
        ranges = ", ".join(f"{s}-{e - 1}" if e - s > 1 else str(s) for s, e in info["layers"]) or "-"
        budget = info["budget_bytes"]
        table.add_row(tier.upper(), f"{ranges} ({info['num_layers']})", ", ".join(info["holds"]) or "-",
                      format_bytes(info["weight_bytes"]), format_bytes(info["reserved_bytes"]),
                      format_bytes(info["total_bytes"]), format_bytes(budget) if budget is not None else "-")
    console.print(table)
    reservations = Table(title="Reserved before weights", title_justify="left")
    for column in ("what", "tier", "bytes", "detail"):
        reservations.add_column(column)
    for r in plan_json["reservations"]:
        reservations.add_row(r["name"], r["tier"].upper(), format_bytes(r["bytes"]), r["detail"])
    console.print(reservations)
    kv, est = plan_json["kv_cache"], plan_json["estimate"]
    streamed = plan_json["streamed_bytes_per_token"]
    console.print(f"KV cache: {kv['num_blocks']} blocks of {kv['block_size']} tokens = {kv['tokens']} tokens "
                  f"({plan_json['ctx']} ctx x {plan_json['batch']} seq), {format_bytes(kv['bytes'])} on "
                  f"{kv['tier'].upper()}", highlight=False)
    console.print(f"Streamed per token: {format_bytes(streamed['total'])} "
                  f"(from CPU {format_bytes(streamed['cpu'])}, from disk {format_bytes(streamed['disk'])})",
                  highlight=False)
    floor = plan_json["floor"]
    console.print(f"Runs from {format_bytes(floor['bytes'])} of {floor['tier'].upper()} memory "
                  f"at this context and batch", highlight=False)
    console.print(_estimate_text(est, plan_json["ctx"], format_tok_s), highlight=False)
    for warning in plan_json["warnings"]:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)


_SOURCE_WORDS = {"probe": "measured", "runs": "measured by runs", "assumed": "assumed"}


def _estimate_text(est: dict, ctx: int, format_tok_s) -> str:
    """The estimate's line: decode at a short and the full context, prefill, each figure and its source."""
    decode = est["decode_tok_s"]
    figures = [f"{name} {v['bytes_per_s'] / 1e9:.1f} GB/s ({_SOURCE_WORDS[v['source']]})"
               for name, v in est["bandwidths"].items()]
    step = est["layer_step_s"]
    figures.append(f"layer step {step['seconds'] * 1e3:.3g} ms ({_SOURCE_WORDS[step['source']]})")
    text = (f"Estimate: decode {format_tok_s(decode['low'], decode['high'])} tok/s per sequence "
            f"({format_tok_s(decode['full_ctx'], decode['full_ctx'])} at the full {ctx}-token context), "
            f"prefill ~{est['prefill_tok_s']:.0f} tok/s; {', '.join(figures)}")
    cache = est["page_cache"]
    if cache["first_read_s"]:
        held = ("not known" if cache["resident_fraction"] is None
                else f"{cache['resident_fraction']:.0%} in the page cache now")
        after = "from the page cache" if cache["warm_after_first_pass"] else "from disk (too large for the page cache)"
        text += (f"\nDisk tier: first pass ~{cache['first_read_s']:.2g} s ({held}), then read {after}")
    return text


def _kernels_text(kernels: dict) -> str:
    if kernels.get("set") is None:
        return "PyTorch's ops (no fused kernels)"
    parts = [f"fused {kernels['set']} kernels"]
    if kernels.get("gemv_shapes"):
        parts.append(f"bf16 GEMV on {len(kernels['gemv_shapes'])} weight shapes")
    if kernels.get("layer"):
        parts.append("float32 layers in one C call")
    if kernels.get("gemv"):
        parts.append("Triton GEMV")
    if kernels.get("cuda_graphs"):
        parts.append("CUDA graphs")
    return ", ".join(parts)


def _spread(stat: dict, digits: int) -> str:
    """A timed figure: the median and, when repetitions differ, their range."""
    if stat["median"] is None:
        return "-"
    median = f"{stat['median']:.{digits}f}"
    low, high = f"{stat['min']:.{digits}f}", f"{stat['max']:.{digits}f}"
    return median if low == high else f"{median} ({low}-{high})"


def _placement_text(placement: dict) -> str:
    """30 layers on CPU; or 20 on GPU, 10 on CPU, 108 MiB streamed per token."""
    from llmrun.sizes import format_bytes

    tiers = [(tier, count) for tier, count in placement["layer_tiers"].items() if count]
    if len(tiers) == 1:
        return f"{tiers[0][1]} layers on {tiers[0][0].upper()}"
    split = ", ".join(f"{count} on {tier.upper()}" for tier, count in tiers)
    return f"layers {split}, {format_bytes(placement['streamed_bytes_per_token'])} streamed per token"


def render_bench(data: dict) -> None:
    """The benchmark report as a Rich table on stdout: every timed figure as median (min-max)."""
    from rich.table import Table

    from llmrun.sizes import format_bytes

    console = _stdout_console()
    machine, placement = data["machine"], data["placement"]
    console.print(f"[bold]{data['model']}[/] {data['dtype']} on {machine.get('gpu') or machine['cpu']} "
                  f"({machine['threads']} threads), {_placement_text(placement)}, ctx {placement['ctx']}; "
                  f"median (min-max) of {data['repetitions']}", highlight=False)
    compare = data["compare"]
    table = Table()
    for column in ("case", "TTFT s", "prefill tok/s", "decode tok/s"):
        table.add_column(column, justify="right" if column != "case" else "left", no_wrap=True)
    if compare != "none":
        for column in (f"{compare} decode", "decode x", "TTFT x", "same tokens"):
            table.add_column(column, justify="right", no_wrap=True)
    for name, entry in data["cases"].items():
        ours = entry["llmrun"]
        row = [name, _spread(ours["ttft_s"], 3), _spread(ours["prefill_tok_s"], 0), _spread(ours["decode_tok_s"], 1)]
        if compare != "none" and compare in entry:
            speed = entry["speedup"]
            row += [_spread(entry[compare]["decode_tok_s"], 1), f"{speed['decode_tok_s']:.2f}",
                    f"{speed['ttft_s']:.2f}" if "ttft_s" in speed else "-",
                    {True: "yes", False: "no"}.get(entry.get("tokens_match"), "-")]
        table.add_row(*row)
    console.print(table)
    kv = data["kv_cache"]
    console.print(f"kernels: {_kernels_text(data['kernels'])}", highlight=False)
    console.print(f"peak RSS {format_bytes(data['peak_rss_bytes'])}"
                  + (f", peak GPU {format_bytes(data['peak_gpu_bytes'])}" if data["peak_gpu_bytes"] else "")
                  + f"; KV waste at most {kv['max_wasted_slots_per_seq']} slots per sequence "
                  f"(block {kv['block_size']})", highlight=False)
