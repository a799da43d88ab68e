"""CPU layer streaming vs accelerate's disk offload: same model, budget, prompt, in one run.

    PYTHONPATH=$PWD python scripts/bench_cpu_offload.py --model smollm2 --budget 150MB [--dtype float32]

llmrun: `--gpu-mem 0 --cpu-mem BUDGET` (layers that do not fit stream from disk, one ahead).
accelerate: `from_pretrained(device_map="auto", max_memory={"cpu": BUDGET}, offload_folder=...)`.
Both decode the same chat-templated prompt greedily for --new-tokens tokens after a warm-up.
The checkpoint (and llmrun's offload cache) are read once beforehand, so both runs read from the
page cache; the script reports the page-cache residency it measured (mincore) for the files.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cached_fraction(paths: list[Path]) -> float:
    """Share of the files' pages in the page cache (mincore on a private mapping), 0..1."""
    libc = ctypes.CDLL(None, use_errno=True)
    page, total, resident = mmap.PAGESIZE, 0, 0
    for path in paths:
        size = path.stat().st_size
        if size == 0:
            continue
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_COPY)
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            anchor = ctypes.c_char.from_buffer(mapped)
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec) == 0:
                resident += sum(v & 1 for v in vec)
                total += pages
            del anchor
            mapped.close()
    return resident / total if total else 0.0


def llmrun_run(folder: Path, budget: int, prompt: str, new_tokens: int, dtype: str) -> dict:
    from llmrun.engine.build import EngineOptions, build_engine
    from llmrun.engine.prompt import prompt_ids
    from llmrun.engine.sampler import SamplingParams
    from llmrun.plan.tiers import Tier

    options = EngineOptions(dtype=dtype, ctx=512, gpu_mem_bytes=0, cpu_mem_bytes=budget)
    with build_engine(folder, options) as engine:
        ids = prompt_ids(engine.tokenizer, prompt)
        engine.eos_ids = frozenset()
        engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=4)).run_to_end()
        [result] = engine.generate([ids], SamplingParams(temperature=0, max_new_tokens=new_tokens)).run_to_end()
        placement = engine.plan.placement
        return {"decode_tok_s": round(result.decode_tok_s, 2), "ttft_s": round(result.ttft_s, 3),
                "disk_layers": sum(t is Tier.DISK for t in placement.layer_tiers),
                "streamed_bytes_per_token": placement.streamed_bytes_per_token(Tier.DISK),
                "tokens": result.tokens}


def accelerate_run(folder: Path, budget: int, prompt: str, new_tokens: int, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory(prefix="accelerate-offload-") as offload:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), device_map="auto",
                                                     max_memory={"cpu": budget}, offload_folder=offload)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - started
        offloaded = [name for name, where in model.hf_device_map.items() if where == "disk"]
        return {"decode_tok_s": round((new_tokens - 1) / (total - ttft), 2), "ttft_s": round(ttft, 3),
                "modules_on_disk": len(offloaded), "tokens": out[0, ids.shape[1]:].tolist()}


def main() -> None:
    from llmrun.hub.resolve import resolve_model
    from llmrun.sizes import parse_size

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--budget", default="150MB")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--prompt", default="Write a short poem about the sea.")
    args = parser.parse_args()
    folder = resolve_model(args.model).path  # never downloads: `llmrun pull` first
    budget = parse_size(args.budget)
    files = sorted(folder.glob("*.safetensors"))
    for file in files:  # warm the page cache for both contenders
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass
    ours = llmrun_run(folder, budget, args.prompt, args.new_tokens, args.dtype)
    theirs = accelerate_run(folder, budget, args.prompt, args.new_tokens, args.dtype)
    report = {
        "model": args.model, "dtype": args.dtype, "budget_bytes": budget, "new_tokens": args.new_tokens,
        "checkpoint_cached_fraction": round(cached_fraction(files), 3),
        "llmrun": {k: v for k, v in ours.items() if k != "tokens"},
        "accelerate": {k: v for k, v in theirs.items() if k != "tokens"},
        "speedup": round(ours["decode_tok_s"] / theirs["decode_tok_s"], 2),
        "same_tokens": ours["tokens"] == theirs["tokens"],
        "threads": __import__("torch").get_num_threads(), "cores": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
