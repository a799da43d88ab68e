"""GPU benchmark (issue: layer streaming; decode speed): one run, everything measured in-process.

Builds a Phi-3-mini-shaped fp16 random checkpoint (Phi3Config defaults, ~7.6 GB) unless it exists,
then measures, in this order and in the same process:
  - HBM read bandwidth and pinned host->GPU bandwidth;
  - llmrun all-resident decode (batch 1 and 8) with its decode steps replayed from CUDA graphs,
    and batch 1 eager (LLMRUN_NO_CUDA_GRAPHS=1), its greedy tokens, the GPU time of one replay, and
    the GPU kernels of one static-shape decode step by total time (torch profiler);
  - llmrun with --gpu-mem 6GB (layers streamed from pinned memory): tokens, peak GPU memory, tok/s
    against the link bound (pinned bandwidth / bytes streamed per token), batch 8;
  - llmrun --quant int4 (layers int4 g32, the head int8 g32; issue 16's GPU targets): all resident,
    and at the fp16 streamed runs' budgets (6 GB, and 2 GB where int4 streams too, beside fp16 at 2 GB),
    run last (the first run quantizes the checkpoint on load; `--skip transformers,static,compiled,
    accelerate` leaves time for them where the device time is short);
  - transformers generate all-resident: dynamic cache, static cache without compiling, and static
    cache compiled (its automatic torch.compile, mode reduce-overhead; the compile is timed apart);
    accelerate dispatch_model with a 6 GiB GPU budget.
Prints one JSON object (and writes it to --out).

Usage: PYTHONPATH=$PWD python scripts/gpu_bench.py --folder /tmp/phi3-mini --out $OUT/gpu_bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

GIB = 1024**3
CONTEXT_BYTES = 0  # CUDA context and library handles, measured at start (outside torch's allocator)


def build_checkpoint(folder: Path) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig, Phi3Config

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.checkpoints import save_tokenizer

    config = Phi3Config(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2).save_pretrained(folder)
    save_tokenizer(folder)
    del model
    torch.cuda.empty_cache()


def hbm_read_bandwidth() -> float:
    data = torch.empty(4 * GIB // 2, dtype=torch.float16, device="cuda").normal_()
    data.sum(dtype=torch.float32)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        data.sum(dtype=torch.float32)
    torch.cuda.synchronize()
    value = 10 * data.numel() * 2 / (time.perf_counter() - started)
    del data
    torch.cuda.empty_cache()
    return value


def pinned_bandwidth() -> float:
    from llmrun.plan.devices import measure_host_to_gpu

    return measure_host_to_gpu(GIB, repeats=5)


def llmrun_decode(folder: Path, prompt: list[int], steps: int, batch: int, gpu_mem=None, ctx=4096,
                  graphs: bool = True, profile: bool = False, quant: str = "none") -> dict:
    import os

    from llmrun.engine.build import EngineOptions, build_engine
    from llmrun.engine.sampler import SamplingParams
    from llmrun.plan.tiers import Tier

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    os.environ["LLMRUN_NO_CUDA_GRAPHS"] = "0" if graphs else "1"
    started = time.perf_counter()
    engine = build_engine(folder, EngineOptions(dtype="float16", gpu_mem_bytes=gpu_mem, batch=batch, ctx=ctx,
                                                quant=quant))
    load_s = time.perf_counter() - started
    engine.eos_ids = frozenset()
    params = SamplingParams(temperature=0, max_new_tokens=steps)
    started = time.perf_counter()
    warmup = engine.generate([prompt] * batch, params).run_to_end()  # every graph this run needs is captured
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    first_token_after_load_s = warmup[0].ttft_s
    started = time.perf_counter()
    results = engine.generate([prompt] * batch, params).run_to_end()
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    placement = engine.plan.placement
    result = {
        "batch": batch, "ctx": ctx, "load_s": round(load_s, 2),
        "graphs": engine.runner.static is not None and engine.runner.static.capture,
        "first_call_s": round(warmup_s, 3), "first_call_ttft_s": round(first_token_after_load_s, 4),
        "decode_tok_s_per_seq": round(min(r.decode_tok_s for r in results), 2),
        "total_tok_s": round(batch * steps / wall, 2),
        "ttft_s": round(results[0].ttft_s, 4),
        "tokens": results[0].tokens,
        "layers_on_gpu": sum(t is Tier.GPU for t in placement.layer_tiers),
        "streamed_bytes_per_token": placement.streamed_bytes_per_token(Tier.CPU) + placement.streamed_bytes_per_token(Tier.DISK),
        "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved(),
        "peak_with_context_bytes": CONTEXT_BYTES + torch.cuda.max_memory_reserved(),
    }
    static = engine.runner.static
    if static is not None and static.capture and static.graphs:  # replayed graphs (streamed steps run eagerly)
        result["graph_keys"] = [list(key) for key in static.graphs]
        result["replay_ms"] = round(replay_ms(static), 4)
        if profile:
            result["step_kernels"] = profile_step(static)
    engine.close()
    del engine
    torch.cuda.empty_cache()
    return result


def replay_ms(static) -> float:
    """GPU time of one replay of the largest captured graph (CUDA events over 50 replays)."""
    graph, _ = static.graphs[max(static.graphs)]
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(50):
        graph.replay()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / 50


def profile_step(static, top: int = 14) -> list:
    """The GPU kernels of one static-shape decode step run eagerly, grouped by name, by total time."""
    from torch.profiler import ProfilerActivity, profile

    key = max(static.graphs)
    seq_lens = (1,) * key[0]
    with torch.inference_mode():
        static._forward(key, seq_lens)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            static._forward(key, seq_lens)
            torch.cuda.synchronize()
    rows = []
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    for e in sorted(events, key=lambda e: -e.device_time_total)[:top]:
        rows.append([e.key[:70], e.count, round(e.device_time_total / 1000, 3), round(e.device_time_total / total, 3)])
    print(f"one eager static step: {sum(e.count for e in events)} kernels, {total / 1000:.2f} ms of GPU time")
    for row in rows:
        print("   ", row)
    return rows


def transformers_decode(folder: Path, prompt: list[int], steps: int, cache: str) -> dict:
    """cache: dynamic | static (compile disabled) | static_compiled (generate's automatic compile)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).cuda()
    ids = torch.tensor([prompt], device="cuda")
    kwargs = dict(do_sample=False, pad_token_id=0, min_new_tokens=steps)
    if cache.startswith("static"):
        kwargs["cache_implementation"] = "static"
        kwargs["disable_compile"] = cache == "static"
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=steps, **kwargs)  # warm-up with the same shapes (compiles, if it does)
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    started = time.perf_counter()
    out = model.generate(ids, max_new_tokens=steps, **kwargs)
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    tokens = out[0, len(prompt):].tolist()
    result = {"cache": cache, "tok_s": round(steps / wall, 2), "first_call_s": round(warmup_s, 2), "tokens": tokens}
    if cache == "dynamic":  # untimed: each step's two best logits, to tell near-ties from errors
        scored = model.generate(ids, max_new_tokens=steps, output_scores=True, return_dict_in_generate=True,
                                **kwargs)
        best = torch.stack(scored.scores)[:, 0].float().topk(2, dim=-1)
        result["top2"] = [[i.tolist(), v.tolist()] for v, i in zip(best.values.cpu(), best.indices.cpu())]
        result["median_top2_gap"] = round((best.values[:, 0] - best.values[:, 1]).median().item(), 4)
    del model
    torch.cuda.empty_cache()
    return result


def accelerate_decode(folder: Path, prompt: list[int], steps: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, device_map="auto",
                                                 max_memory={0: 6 * 10**9, "cpu": 100 * 10**9})
    ids = torch.tensor([prompt], device="cuda")
    model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    on_gpu = sum(1 for v in model.hf_device_map.values() if v == 0)
    del model
    torch.cuda.empty_cache()
    return {"tok_s": round(steps / wall, 2), "modules_on_gpu": on_gpu}


def step(results: dict, name: str, fn, *args) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as err:  # keep going: one broken measurement must not hide the others
        import traceback

        traceback.print_exc()
        results[name] = {"error": f"{type(err).__name__}: {err}"}
    print(f"[{time.perf_counter() - started:6.1f} s] {name}: "
          f"{ {k: v for k, v in results[name].items() if k != 'tokens'} if isinstance(results[name], dict) else results[name]}",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", type=Path, default=Path("/tmp/phi3-mini"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--skip", default="", help="comma list: transformers,static,compiled,accelerate,batch8,streamed,int4")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if not (args.folder / "config.json").exists():
        started = time.perf_counter()
        build_checkpoint(args.folder)
        print(f"built checkpoint in {time.perf_counter() - started:.1f} s", flush=True)
    prompt = torch.randint(3, 320, (32,), generator=torch.Generator().manual_seed(0)).tolist()
    global CONTEXT_BYTES
    torch.ones(1, device="cuda") @ torch.ones(1, 1, device="cuda")  # create the context and cuBLAS handle
    free, total = torch.cuda.mem_get_info()
    CONTEXT_BYTES = total - free - torch.cuda.memory_reserved()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "context_bytes": CONTEXT_BYTES}
    results["hbm_read_bytes_s"] = hbm_read_bandwidth()
    results["pinned_h2d_bytes_s"] = pinned_bandwidth()
    print(f"HBM read {results['hbm_read_bytes_s'] / 1e9:.0f} GB/s, pinned H2D {results['pinned_h2d_bytes_s'] / 1e9:.1f} GB/s", flush=True)
    weight_bytes = sum(f.stat().st_size for f in args.folder.glob("*.safetensors"))
    results["weight_bytes"] = weight_bytes
    step(results, "llmrun_resident_b1", llmrun_decode, args.folder, prompt, args.steps, 1, None, 4096, True, True)
    step(results, "llmrun_resident_b1_eager", llmrun_decode, args.folder, prompt, 32, 1, None, 4096, False)
    if "streamed" not in skip:
        step(results, "llmrun_gpu6gb_ctx4096_b1", llmrun_decode, args.folder, prompt, 32, 1, 6 * 10**9, 4096)
        step(results, "llmrun_gpu6gb_b1", llmrun_decode, args.folder, prompt, 48, 1, 6 * 10**9, 512)
    if "batch8" not in skip:
        if "streamed" not in skip:
            step(results, "llmrun_gpu6gb_b8", llmrun_decode, args.folder, prompt, 16, 8, 6 * 10**9, 512)
        step(results, "llmrun_resident_b8", llmrun_decode, args.folder, prompt, args.steps, 8)
    if "transformers" not in skip:
        step(results, "transformers_dynamic", transformers_decode, args.folder, prompt, args.steps, "dynamic")
    if "static" not in skip:
        step(results, "transformers_static", transformers_decode, args.folder, prompt, args.steps, "static")
    if "compiled" not in skip:
        step(results, "transformers_static_compiled", transformers_decode, args.folder, prompt, args.steps,
             "static_compiled")
    if "accelerate" not in skip:
        step(results, "accelerate_6gb", accelerate_decode, args.folder, prompt, 16)
    if "int4" not in skip:  # last: quantizing on load (cached in LLMRUN_HOME) takes a while the first time
        step(results, "llmrun_int4_resident_b1", llmrun_decode, args.folder, prompt, args.steps, 1, None, 4096,
             True, False, "int4")
        if "streamed" not in skip:
            step(results, "llmrun_int4_gpu6gb_b1", llmrun_decode, args.folder, prompt, 48, 1, 6 * 10**9, 512,
                 True, False, "int4")
            step(results, "llmrun_int4_gpu2gb_b1", llmrun_decode, args.folder, prompt, 32, 1, 2 * 10**9, 512,
                 True, False, "int4")
            step(results, "llmrun_gpu2gb_b1", llmrun_decode, args.folder, prompt, 16, 1, 2 * 10**9, 512)
    summarize(results)
    text = json.dumps(results, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)


def summarize(r: dict) -> None:
    resident, streamed = r.get("llmrun_resident_b1", {}), r.get("llmrun_gpu6gb_b1", {})
    summary = {}
    if "decode_tok_s_per_seq" in resident:
        summary["hbm_bound_tok_s"] = round(r["hbm_read_bytes_s"] / r["weight_bytes"], 1)
        summary["resident_vs_hbm_bound"] = round(resident["decode_tok_s_per_seq"] / summary["hbm_bound_tok_s"], 3)
    if "decode_tok_s_per_seq" in streamed:
        bound = r["pinned_h2d_bytes_s"] / max(1, streamed["streamed_bytes_per_token"])
        summary["link_bound_tok_s"] = round(bound, 2)
        summary["streamed_vs_link_bound"] = round(streamed["decode_tok_s_per_seq"] / bound, 3)
        summary["streamed_peak_with_context_gb"] = round(streamed["peak_with_context_bytes"] / 1e9, 3)
        if "tokens" in resident:
            n = len(streamed["tokens"])
            summary["streamed_tokens_equal_resident"] = streamed["tokens"] == resident["tokens"][:n]
        acc = r.get("accelerate_6gb", {})
        if "tok_s" in acc:
            summary["streamed_vs_accelerate"] = round(streamed["decode_tok_s_per_seq"] / acc["tok_s"], 2)
    for quantized, plain in (("llmrun_int4_resident_b1", "llmrun_resident_b1"),  # issue 16: >= 2.5x
                             ("llmrun_int4_gpu6gb_b1", "llmrun_gpu6gb_b1"),  # >= 3x at the same budget
                             ("llmrun_int4_gpu2gb_b1", "llmrun_gpu2gb_b1")):
        if "decode_tok_s_per_seq" in r.get(quantized, {}) and "decode_tok_s_per_seq" in r.get(plain, {}):
            summary[f"{quantized}_vs_fp16"] = round(r[quantized]["decode_tok_s_per_seq"]
                                                    / r[plain]["decode_tok_s_per_seq"], 2)
    eager = r.get("llmrun_resident_b1_eager", {})
    if "tokens" in eager and "tokens" in resident:
        summary["eager_tokens_equal_graphs"] = eager["tokens"] == resident["tokens"][: len(eager["tokens"])]
    for name in ("transformers_dynamic", "transformers_static", "transformers_static_compiled"):
        if "tok_s" in r.get(name, {}) and "decode_tok_s_per_seq" in resident:
            # like for like: both are new tokens over the whole generate call, prefill included
            summary[f"resident_vs_{name}"] = round(resident["total_tok_s"] / r[name]["tok_s"], 2)
            n = min(len(r[name]["tokens"]), len(resident.get("tokens", [])))
            ours, theirs = resident["tokens"][:n], r[name]["tokens"][:n]
            summary[f"tokens_equal_{name}"] = ours == theirs
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
            summary[f"first_divergence_{name}"] = first
            if first is not None and "top2" in r[name]:  # was it a near-tie, and ours their runner-up?
                (ids, values) = r[name]["top2"][first]
                summary[f"divergence_{name}"] = {"their_top2_gap": round(values[0] - values[1], 4),
                                                 "ours_is_their_second": ours[first] == ids[1]}
    r["summary"] = summary


if __name__ == "__main__":
    main()
