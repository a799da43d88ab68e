"""Probe: can a hand-written Triton GEMV read fp16 weights faster than cuBLAS at batch 1 (M = 1)?

Why: the decode-speed issue's GPU target is >= 70% of the HBM bandwidth bound for batch-1 fp16 decode,
and on an H200 the cuBLAS GEMVs behind torch.nn.functional.linear were measured at ~77% of the
bandwidth. A batch-1 decode step is almost only these matmuls (every weight read once per token), so
the step time is bounded by how close each GEMV gets to the bandwidth. This script measures that, in
one process, for Phi-3-mini's fp16 shapes (W [N, K] row-major as in nn.Linear, y = x @ W.T, x [1, K]):

  - the device's read bandwidth (torch.sum over a 2 GB fp16 tensor; a copy too);
  - per shape, cuBLAS (F.linear) against `gemv_kernel` (BLOCK_N rows a program, a loop over K in
    BLOCK_K chunks, fp32 sums, fp16 out; optionally split over K with an fp32 partial reduce),
    the best of a config sweep (all configs on qkv and down, the top ones on the other shapes,
    split-K on the small-N shapes o and down), in us and GB/s, with the error of the best;
  - `gemv_rmsnorm_kernel`: the same GEMV with the RMSNorm before it fused in (qkv and gate_up),
    against a norm kernel followed by cuBLAS;
  - one decode step's matmul time (32 layers of qkv, o, gate_up, down, then lm_head) for each.

Timing: CUDA events around each call, median of 50 after 10 warm-ups; the calls are queued behind a
GPU sleep, so the events time the kernels and not Python's launch cost (llmrun replays decode steps
from CUDA graphs, where launches cost nothing). Each call reads a different copy of W, enough copies
to pass 200 MB, so that W comes from HBM and not from the 50 MB L2.

Usage: python scripts/gpu_gemv_probe.py [--json PATH]      (on a CUDA GPU; a minute or two on an H100)
       python scripts/gpu_gemv_probe.py --selftest         (CPU, Triton's interpreter, tiny shapes)
"""

from __future__ import annotations

import os
import sys

if "--selftest" in sys.argv:  # Triton reads this when it is imported
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

LAYERS = 32
EPS = 1e-5
TOLERANCE = 1e-2  # max |error| / max |reference| a kernel's output must stay under
ROTATE_BYTES = 200e6  # the W copies a shape rotates among add up to more than this (H100 L2: 50 MB)
BANDWIDTH_BYTES = 2e9
MAX_TILE = 8192  # BLOCK_N * BLOCK_K
TOP = 5  # configs of the sweep tried on the other shapes
TOP_WIDE = 3  # and the best with BLOCK_N >= 8 (few programs, where split-K can help), split over K
SPLITS = (2, 4, 8)
REDUCE_BLOCK = 1024
LAYER_SHAPES = ("qkv", "o", "gate_up", "down")
SWEPT = ("qkv", "down")  # every config
SPLIT_SHAPES = ("o", "down")  # small N: split-K tried
NORMED = ("qkv", "gate_up")  # the projections that follow an RMSNorm
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    n: int
    k: int

    @property
    def bytes(self) -> int:
        return self.n * self.k * 2


PHI3_MINI = (Shape("qkv", 9216, 3072), Shape("o", 3072, 3072), Shape("gate_up", 16384, 3072),
             Shape("down", 3072, 8192), Shape("lm_head", 32064, 3072))


@dataclasses.dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    warps: int
    split_k: int = 1
    reduce_each: bool = False  # sum each chunk to [BLOCK_N] (fewer registers), not a [BLOCK_N, BLOCK_K] accumulator

    @property
    def label(self) -> str:
        return (f"n{self.block_n}_k{self.block_k}_w{self.warps}" + ("_r" if self.reduce_each else "")
                + (f"_s{self.split_k}" if self.split_k > 1 else ""))


def sweep_configs() -> list[Config]:
    """BLOCK_N x BLOCK_K x num_warps, tiles up to MAX_TILE; tiles from 2048 also with a per-chunk sum."""
    configs = []
    for block_n in (1, 2, 4, 8, 16):
        for block_k in (128, 256, 512, 1024):
            if block_n * block_k > MAX_TILE:
                continue
            for warps in (1, 2, 4, 8):
                configs.append(Config(block_n, block_k, warps))
                if block_n * block_k >= 2048:
                    configs.append(Config(block_n, block_k, warps, reduce_each=True))
    return configs


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _load_w(w_rows, rows, ks, N, K, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(w_rows + ks[None, :], eviction_policy="evict_first")
    mask = (rows[:, None] < N) & (ks[None, :] < K)
    return tl.load(w_rows + ks[None, :], mask=mask, other=0.0, eviction_policy="evict_first")


@triton.jit
def _accumulator(BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, REDUCE_EACH: tl.constexpr):
    """fp32 partial sums: one per row (REDUCE_EACH: each chunk summed as it comes) or per row and column."""
    if REDUCE_EACH:
        return tl.zeros([BLOCK_N], dtype=tl.float32)
    return tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)


@triton.jit
def _accumulate(acc, w, x, REDUCE_EACH: tl.constexpr):
    product = w.to(tl.float32) * x.to(tl.float32)[None, :]
    if REDUCE_EACH:
        return acc + tl.sum(product, axis=1)
    return acc + product


@triton.jit
def _row_sums(acc, REDUCE_EACH: tl.constexpr):
    if REDUCE_EACH:
        return acc
    return tl.sum(acc, axis=1)


@triton.jit
def gemv_kernel(w_ptr, x_ptr, y_ptr, N, K, k_per_split, chunks, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN: tl.constexpr, REDUCE_EACH: tl.constexpr, PARTIAL: tl.constexpr, CHUNKS: tl.constexpr):
    """y[n] = sum_k W[n, k] * x[k] in fp32 for BLOCK_N rows, over K's split program_id(1) (k_per_split
    wide, a multiple of BLOCK_K; the last split's chunks past K are masked off unless EVEN).
    PARTIAL: the fp32 sums go to y[split, n]; else fp16 to y[n]. chunks: k_per_split / BLOCK_K; CHUNKS: the
    same where the interpreter runs (its scalars are 1-element arrays, which numpy >= 2.4 will not turn into
    a loop bound), else 0."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    k_start = tl.program_id(1) * k_per_split
    w_rows = w_ptr + rows[:, None] * K
    acc = _accumulator(BLOCK_N, BLOCK_K, REDUCE_EACH)
    for i in range(0, chunks if CHUNKS == 0 else CHUNKS):  # not assigned: the interpreter makes that a tensor
        ks = k_start + i * BLOCK_K + cols
        w = _load_w(w_rows, rows, ks, N, K, EVEN)
        if EVEN:
            x = tl.load(x_ptr + ks)
        else:
            x = tl.load(x_ptr + ks, mask=ks < K, other=0.0)
        acc = _accumulate(acc, w, x, REDUCE_EACH)
    y = _row_sums(acc, REDUCE_EACH)
    if PARTIAL:
        tl.store(y_ptr + tl.program_id(1) * N + rows, y, mask=rows < N)
    else:
        tl.store(y_ptr + rows, y.to(tl.float16), mask=rows < N)


@triton.jit
def splitk_reduce_kernel(partials_ptr, y_ptr, N, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """y[n] = fp16(sum over splits of partials[split, n])."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    splits = tl.arange(0, SPLIT_K)
    parts = tl.load(partials_ptr + splits[:, None] * N + offsets[None, :], mask=offsets[None, :] < N, other=0.0)
    tl.store(y_ptr + offsets, tl.sum(parts, axis=0).to(tl.float16), mask=offsets < N)


@triton.jit
def gemv_rmsnorm_kernel(w_ptr, h_ptr, g_ptr, y_ptr, N, K, eps, chunks, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN: tl.constexpr, REDUCE_EACH: tl.constexpr, CHUNKS: tl.constexpr):
    """y = W @ rms_norm(h) * g for BLOCK_N rows: every program first sums h's squares over all of K,
    then normalizes each chunk of h as transformers' LlamaRMSNorm rounds (fp32, to fp16, times g).
    chunks: cdiv(K, BLOCK_K); CHUNKS as in gemv_kernel."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for i in range(0, chunks if CHUNKS == 0 else CHUNKS):
        ks = i * BLOCK_K + cols
        h32 = tl.load(h_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        squares += h32 * h32
    var = tl.sum(squares, axis=0) / K
    w_rows = w_ptr + rows[:, None] * K
    acc = _accumulator(BLOCK_N, BLOCK_K, REDUCE_EACH)
    for i in range(0, chunks if CHUNKS == 0 else CHUNKS):
        ks = i * BLOCK_K + cols
        w = _load_w(w_rows, rows, ks, N, K, EVEN)
        h32 = tl.load(h_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + ks, mask=ks < K, other=0.0)
        x = g * (h32 * tl.rsqrt(var + eps)).to(tl.float16)  # fp16 times fp16
        acc = _accumulate(acc, w, x, REDUCE_EACH)
    y = _row_sums(acc, REDUCE_EACH)
    tl.store(y_ptr + rows, y.to(tl.float16), mask=rows < N)


@triton.jit
def rmsnorm_kernel(h_ptr, g_ptr, out_ptr, K, eps, BLOCK: tl.constexpr):
    """The norm alone (one program, one row), rounded as in gemv_rmsnorm_kernel: the unfused baseline."""
    ks = tl.arange(0, BLOCK)
    h32 = tl.load(h_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
    var = tl.sum(h32 * h32, axis=0) / K
    g = tl.load(g_ptr + ks, mask=ks < K, other=0.0)
    tl.store(out_ptr + ks, g * (h32 * tl.rsqrt(var + eps)).to(tl.float16), mask=ks < K)


def k_per_split(k: int, cfg: Config) -> int:
    return triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k


def usable(cfg: Config, shape: Shape) -> bool:
    """Split-K only where no split is left empty (splits are whole BLOCK_K chunks)."""
    return cfg.split_k == 1 or k_per_split(shape.k, cfg) * (cfg.split_k - 1) < shape.k


def _even(n: int, k: int, cfg: Config) -> bool:
    """No masks needed: whole row blocks, and the splits' chunks tile K exactly."""
    return n % cfg.block_n == 0 and k % cfg.block_k == 0 and k_per_split(k, cfg) * cfg.split_k == k


def gemv(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, partials: torch.Tensor, cfg: Config) -> torch.Tensor:
    """out [N] = W [N, K] @ x [1, K] (fp16); with split-K, through partials [>= split_k, N] fp32."""
    n, k = w.shape
    grid = (triton.cdiv(n, cfg.block_n), cfg.split_k)
    chunks = k_per_split(k, cfg) // cfg.block_k
    gemv_kernel[grid](w, x, out if cfg.split_k == 1 else partials, n, k, k_per_split(k, cfg), chunks,
                      BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, EVEN=_even(n, k, cfg), REDUCE_EACH=cfg.reduce_each,
                      PARTIAL=cfg.split_k > 1, CHUNKS=chunks if INTERPRETED else 0, num_warps=cfg.warps)
    if cfg.split_k > 1:
        splitk_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK),)](partials, out, n, SPLIT_K=cfg.split_k,
                                                               BLOCK=REDUCE_BLOCK, num_warps=4)
    return out


def gemv_rmsnorm(w: torch.Tensor, h: torch.Tensor, g: torch.Tensor, out: torch.Tensor, cfg: Config) -> torch.Tensor:
    """out [N] = W [N, K] @ (rms_norm(h [1, K]) * g [K]), the norm fused in (split_k must be 1)."""
    n, k = w.shape
    chunks = triton.cdiv(k, cfg.block_k)
    gemv_rmsnorm_kernel[(triton.cdiv(n, cfg.block_n),)](w, h, g, out, n, k, EPS, chunks, BLOCK_N=cfg.block_n,
                                                         BLOCK_K=cfg.block_k, EVEN=_even(n, k, cfg),
                                                         REDUCE_EACH=cfg.reduce_each,
                                                         CHUNKS=chunks if INTERPRETED else 0, num_warps=cfg.warps)
    return out


def rmsnorm(h: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    k = h.shape[-1]
    rmsnorm_kernel[(1,)](h, g, out, k, EPS, BLOCK=triton.next_power_of_2(k), num_warps=4)
    return out


def rmsnorm_reference(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    h32 = h.float()
    return g * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + EPS)).half()


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.reshape(-1).float()
    return ((out.reshape(-1).float() - reference).abs().max() / reference.abs().max()).item()


# ------------------------------------------------------------------------------------------------ timing


class Timer:
    """The median time in us of fn(i) (i: which weight copy to read) over runs, after warm-ups."""

    def __init__(self, runs: int, warmup: int):
        self.runs, self.warmup = runs, warmup

    def median_us(self, fn: Callable[[int], object], runs: Optional[int] = None,
                  warmup: Optional[int] = None) -> float:
        raise NotImplementedError


class CpuTimer(Timer):
    """Wall clock (the self-test: the interpreter runs synchronously)."""

    def median_us(self, fn: Callable[[int], object], runs: Optional[int] = None,
                  warmup: Optional[int] = None) -> float:
        runs, warmup = runs or self.runs, self.warmup if warmup is None else warmup
        for i in range(warmup):
            fn(i)
        times = []
        for i in range(runs):
            started = time.perf_counter()
            fn(warmup + i)
            times.append((time.perf_counter() - started) * 1e6)
        return statistics.median(times)


class CudaTimer(Timer):
    """CUDA events around each call, the calls queued behind a GPU sleep: the events then time the
    kernels, not the launches. If the sleep ended before the last call was queued, it is doubled
    and the runs repeated."""

    def __init__(self, runs: int, warmup: int, sleep_cycles: int = 20_000_000):
        super().__init__(runs, warmup)
        self.sleep_cycles = sleep_cycles

    def median_us(self, fn: Callable[[int], object], runs: Optional[int] = None,
                  warmup: Optional[int] = None) -> float:
        runs, warmup = runs or self.runs, self.warmup if warmup is None else warmup
        for i in range(warmup):
            fn(i)
        torch.cuda.synchronize()
        for _ in range(4):
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(runs)]
            torch.cuda._sleep(self.sleep_cycles)
            for i in range(runs):
                starts[i].record()
                fn(warmup + i)
                ends[i].record()
            backed_up = not starts[0].query()  # the GPU had not begun the first call when the last was queued
            torch.cuda.synchronize()
            if backed_up:
                break
            self.sleep_cycles *= 2
        return statistics.median(start.elapsed_time(end) * 1e3 for start, end in zip(starts, ends))


# -------------------------------------------------------------------------------------------- measuring


class Problem:
    """One shape's tensors: `copies` copies of one random W (each call reads the next, so that W comes
    from HBM, not L2), x, and RMSNorm's h and g; output buffers."""

    def __init__(self, shape: Shape, device: torch.device, rotate_bytes: float, seed: int):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        master = torch.randn(shape.n, shape.k, generator=gen, device=device).div_(math.sqrt(shape.k))
        self.shape, self.copies = shape, max(1, math.ceil(rotate_bytes / shape.bytes))
        self.weights = [master.half() for _ in range(self.copies)]
        del master
        self.x = torch.randn(1, shape.k, generator=gen, device=device).half()
        self.h = (2 * torch.randn(1, shape.k, generator=gen, device=device)).half()
        self.g = (1 + 0.1 * torch.randn(shape.k, generator=gen, device=device)).half()
        self.out = torch.empty(shape.n, dtype=torch.float16, device=device)
        self.normed = torch.empty_like(self.h)
        self.partials = torch.empty(max(SPLITS), shape.n, dtype=torch.float32, device=device)

    def w(self, i: int) -> torch.Tensor:
        return self.weights[i % self.copies]


def timed(timer: Timer, fn: Callable[[int], object], label: str, failures: list[str]) -> Optional[float]:
    """The time of fn, or None (noted in failures) where it raises, e.g. a config out of resources."""
    try:
        return timer.median_us(fn)
    except Exception as exc:  # a config that cannot compile or launch is skipped, not fatal
        failures.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return None


def sweep(p: Problem, configs: list[Config], timer: Timer, failures: list[str]) -> dict[Config, Optional[float]]:
    started = time.perf_counter()
    results = {}
    for cfg in configs:
        if usable(cfg, p.shape):
            results[cfg] = timed(timer, lambda i, c=cfg: gemv(p.w(i), p.x, p.out, p.partials, c),
                                 f"{p.shape.name} {cfg.label}", failures)
    print(f"  {p.shape.name}: {len(results)} configs in {time.perf_counter() - started:.1f} s", flush=True)
    return results


def rank(sweeps: list[dict[Config, Optional[float]]]) -> list[Config]:
    """Configs that ran on every sweep, by their mean time relative to each sweep's best."""
    bests = [min(t for t in s.values() if t is not None) for s in sweeps]
    scores = {}
    for cfg in sweeps[0]:
        times = [s.get(cfg) for s in sweeps]
        if all(t is not None for t in times):
            scores[cfg] = statistics.mean(t / best for t, best in zip(times, bests))
    return sorted(scores, key=scores.get)


def measure_bandwidth(device: torch.device, timer: Timer, nbytes: float) -> dict:
    """Read bandwidth (torch.sum in fp32 over an fp16 tensor) and copy bandwidth (bytes read + written)."""
    data = torch.empty(int(nbytes) // 2, dtype=torch.float16, device=device).normal_()
    sum_us = timer.median_us(lambda i: data.sum(dtype=torch.float32), runs=10, warmup=2)
    half = data.numel() // 2
    dst = torch.empty(half, dtype=torch.float16, device=device)
    copy_us = timer.median_us(lambda i: dst.copy_(data[:half]), runs=10, warmup=2)
    return {"bytes": int(nbytes), "read_us": sum_us, "read_gbps": nbytes / sum_us / 1e3,
            "copy_us": copy_us, "copy_gbps": 2 * half * 2 / copy_us / 1e3}


def figures(shape: Shape, us: float, read_gbps: float) -> dict:
    gbps = shape.bytes / us / 1e3
    return {"us": us, "gbps": gbps, "frac_bw": gbps / read_gbps}


def best_of(times: dict[Config, Optional[float]]) -> Optional[Config]:
    valid = [cfg for cfg, t in times.items() if t is not None]
    return min(valid, key=times.get) if valid else None


def shape_report(p: Problem, torch_us: float, times: dict[Config, Optional[float]], read_gbps: float) -> dict:
    """cuBLAS against the best Triton config (and, where split-K ran, the best with and without it),
    with both outputs' errors against an fp32 reference."""
    shape, best = p.shape, best_of(times)
    reference = F.linear(p.x.float(), p.w(0).float())
    report = {"n": shape.n, "k": shape.k, "bytes": shape.bytes, "copies": p.copies,
              "torch": figures(shape, torch_us, read_gbps),
              "torch_rel_err": relative_error(F.linear(p.x, p.w(0)), reference),
              "configs": {cfg.label: t for cfg, t in times.items()}}
    if best is None:
        return report
    report["triton"] = {"config": best.label, **figures(shape, times[best], read_gbps)}
    report["speedup"] = torch_us / times[best]
    report["triton_rel_err"] = relative_error(gemv(p.w(0), p.x, p.out, p.partials, best), reference)
    report["ok"] = report["triton_rel_err"] < TOLERANCE
    if any(cfg.split_k > 1 for cfg in times):
        for key, keep in (("best_split1", lambda c: c.split_k == 1), ("best_splitk", lambda c: c.split_k > 1)):
            cfg = best_of({c: t for c, t in times.items() if keep(c)})
            report[key] = None if cfg is None else {"config": cfg.label, **figures(shape, times[cfg], read_gbps)}
    return report


def rmsnorm_report(p: Problem, candidates: list[Config], gemv_cfg: Config, timer: Timer, read_gbps: float,
                   failures: list[str]) -> dict:
    """The fused norm + GEMV (best of the candidates) against the norm kernel, then cuBLAS or the best GEMV."""
    shape = p.shape
    fused = {cfg: timed(timer, lambda i, c=cfg: gemv_rmsnorm(p.w(i), p.h, p.g, p.out, c),
                        f"{shape.name} rmsnorm {cfg.label}", failures) for cfg in candidates if cfg.split_k == 1}
    report = {"configs": {cfg.label: t for cfg, t in fused.items()},
              "norm_us": timer.median_us(lambda i: rmsnorm(p.h, p.g, p.normed)),
              "norm_plus_torch_us": timer.median_us(lambda i: F.linear(rmsnorm(p.h, p.g, p.normed), p.w(i))),
              "norm_plus_triton_us": timer.median_us(
                  lambda i: gemv(p.w(i), rmsnorm(p.h, p.g, p.normed), p.out, p.partials, gemv_cfg)),
              "norm_plus_triton_config": gemv_cfg.label}
    normed = rmsnorm_reference(p.h, p.g)
    report["norm_rel_err"] = relative_error(rmsnorm(p.h, p.g, p.normed), normed)
    best = best_of(fused)
    if best is not None:
        out = gemv_rmsnorm(p.w(0), p.h, p.g, p.out, best)
        report["fused"] = {"config": best.label, **figures(shape, fused[best], read_gbps)}
        report["fused_rel_err"] = relative_error(out, F.linear(normed.float(), p.w(0).float()))
        report["ok"] = report["fused_rel_err"] < TOLERANCE and report["norm_rel_err"] < TOLERANCE
    return report


def decode_totals(shapes: dict[str, dict], norms: dict[str, dict], read_gbps: float) -> dict:
    """One decode step's matmuls: LAYERS x (qkv + o + gate_up + down) + lm_head, each way."""
    def step(us: dict[str, float]) -> float:
        return LAYERS * sum(us[name] for name in LAYER_SHAPES) + us["lm_head"]

    cublas = {name: r["torch"]["us"] for name, r in shapes.items()}
    triton_us = {name: r["triton"]["us"] for name, r in shapes.items()}
    totals = {"cublas": step(cublas), "triton": step(triton_us)}
    if norms and all("fused" in r for r in norms.values()):
        totals["norm kernel + cublas"] = step({**cublas, **{n: r["norm_plus_torch_us"] for n, r in norms.items()}})
        totals["norm kernel + triton"] = step({**triton_us,
                                                **{n: r["norm_plus_triton_us"] for n, r in norms.items()}})
        totals["triton, norm fused"] = step({**triton_us, **{n: r["fused"]["us"] for n, r in norms.items()}})
    step_bytes = LAYERS * sum(shapes[name]["bytes"] for name in LAYER_SHAPES) + shapes["lm_head"]["bytes"]
    bound_us = step_bytes / read_gbps / 1e3
    return {"layers": LAYERS, "step_bytes": step_bytes, "bound_us": bound_us, "bound_tok_s": 1e6 / bound_us,
            "totals": {key: {"us": us, "tok_s": 1e6 / us, "frac_bound": bound_us / us} for key, us in totals.items()}}


def environment(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "triton": triton.__version__,
            "interpreter": INTERPRETED}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda,
                    memory_gib=round(props.total_memory / 2**30, 1))
    return info


def run(shapes: tuple[Shape, ...], configs: list[Config], device: torch.device, timer: Timer,
        rotate_bytes: float, bandwidth_bytes: float, results: dict) -> dict:
    """Fills results (so a crash keeps what was measured): see the module docstring for the plan."""
    started = time.perf_counter()
    results["environment"], results["failures"] = environment(device), []
    failures = results["failures"]
    bandwidth = results["bandwidth"] = measure_bandwidth(device, timer, bandwidth_bytes)
    print(f"read bandwidth {bandwidth['read_gbps']:.0f} GB/s, copy {bandwidth['copy_gbps']:.0f} GB/s", flush=True)
    problems = {s.name: Problem(s, device, rotate_bytes, seed) for seed, s in enumerate(shapes)}
    torch_us = {name: timer.median_us(lambda i, p=p: F.linear(p.x, p.w(i))) for name, p in problems.items()}
    times: dict[str, dict[Config, Optional[float]]] = {name: {} for name in problems}
    for name in SWEPT:
        times[name].update(sweep(problems[name], configs, timer, failures))
    order = rank([times[name] for name in SWEPT])
    candidates = order[:TOP]
    split_bases = list(dict.fromkeys(candidates + [c for c in order if c.block_n >= 8][:TOP_WIDE]))
    results["candidates"] = [cfg.label for cfg in candidates]
    for name in problems:
        if name not in SWEPT:
            times[name].update(sweep(problems[name], candidates, timer, failures))
    split_configs = [dataclasses.replace(c, split_k=s) for c in split_bases for s in SPLITS]
    for name in SPLIT_SHAPES:
        times[name].update(sweep(problems[name], split_configs, timer, failures))
    read_gbps = bandwidth["read_gbps"]
    reports = results["shapes"] = {name: shape_report(p, torch_us[name], times[name], read_gbps)
                                   for name, p in problems.items()}
    results["rmsnorm"] = {name: rmsnorm_report(problems[name], candidates, best_of(times[name]), timer, read_gbps,
                                               failures) for name in NORMED}
    results["decode_step"] = decode_totals(reports, results["rmsnorm"], read_gbps)
    results["elapsed_s"] = time.perf_counter() - started
    return results


# --------------------------------------------------------------------------------------------- reporting


def print_tables(results: dict) -> None:
    bw = results["bandwidth"]
    print(f"\n{results['environment'].get('gpu', results['environment']['device'])}: read {bw['read_gbps']:.0f} GB/s"
          f" (torch.sum over {bw['bytes'] / 1e9:.1f} GB fp16), copy {bw['copy_gbps']:.0f} GB/s")
    print(f"\n{'shape':8} {'N':>6} {'K':>5} {'MB':>6} {'cp':>3} | {'cuBLAS us':>9} {'GB/s':>6} {'%bw':>4} | "
          f"{'Triton best':18} {'us':>7} {'GB/s':>6} {'%bw':>4} | {'cuB/Tri':>7} {'err':>8}")
    for name, r in results["shapes"].items():
        t, tri = r["torch"], r.get("triton")
        cells = (f"{tri['config']:18} {tri['us']:7.1f} {tri['gbps']:6.0f} {100 * tri['frac_bw']:3.0f}% | "
                 f"{r['speedup']:7.3f} {r['triton_rel_err']:8.1e}") if tri else "(no Triton config ran)"
        print(f"{name:8} {r['n']:6} {r['k']:5} {r['bytes'] / 1e6:6.1f} {r['copies']:3} | {t['us']:9.1f} "
              f"{t['gbps']:6.0f} {100 * t['frac_bw']:3.0f}% | {cells}")
    for name, r in results["shapes"].items():
        if r.get("best_split1") and r.get("best_splitk"):
            one, split = r["best_split1"], r["best_splitk"]
            print(f"split-K {name}: best without {one['config']} {one['us']:.1f} us, "
                  f"with {split['config']} {split['us']:.1f} us")
    print(f"\n{'RMSNorm + GEMV':14} {'norm us':>7} | {'norm+cuBLAS':>11} {'norm+Triton':>11} | "
          f"{'fused':18} {'us':>7} {'%bw':>4} {'err':>8}")
    for name, r in results["rmsnorm"].items():
        fused = r.get("fused")
        cells = f"{fused['config']:18} {fused['us']:7.1f} {100 * fused['frac_bw']:3.0f}% {r['fused_rel_err']:8.1e}" \
            if fused else "(no fused config ran)"
        print(f"{name:14} {r['norm_us']:7.1f} | {r['norm_plus_torch_us']:11.1f} {r['norm_plus_triton_us']:11.1f} | "
              f"{cells}")
    step = results["decode_step"]
    print(f"\ndecode step, matmuls only ({step['layers']} layers + lm_head, {step['step_bytes'] / 1e9:.2f} GB): "
          f"bound {step['bound_us']:.0f} us = {step['bound_tok_s']:.0f} tok/s at the read bandwidth")
    for key, row in step["totals"].items():
        print(f"  {key:22} {row['us']:9.0f} us {row['tok_s']:8.0f} tok/s {100 * row['frac_bound']:5.1f}% of bound")
    if results["failures"]:
        print(f"\n{len(results['failures'])} config(s) failed, e.g. {results['failures'][0]}")
    print(f"\n{results.get('elapsed_s', 0):.0f} s")


# ------------------------------------------------------------------------------------------------ self-test


def check_kernels(device: torch.device) -> list[str]:
    """Each kernel on tiny shapes (one ragged) against torch: plain, per-chunk sum, split-K, RMSNorm."""
    problems = []
    configs = (Config(4, 128, 1), Config(8, 256, 2, reduce_each=True), Config(4, 128, 1, split_k=2),
               Config(2, 128, 2, split_k=4), Config(8, 128, 1, split_k=2, reduce_each=True))
    split_ran = 0
    for seed, shape in enumerate((Shape("a", 64, 256), Shape("b", 32, 512), Shape("ragged", 40, 320))):
        p = Problem(shape, device, 0, seed)
        reference = F.linear(p.x.float(), p.w(0).float())
        normed = rmsnorm_reference(p.h, p.g)
        norm_error = (rmsnorm(p.h, p.g, p.normed).float() - normed.float()).abs().max().item()
        if norm_error > 1e-3 * normed.abs().max().item():
            problems.append(f"rmsnorm {shape}: {norm_error}")
        for cfg in configs:
            if not usable(cfg, shape):
                continue
            split_ran += cfg.split_k > 1
            checks = [("gemv", gemv(p.w(0), p.x, p.out, p.partials, cfg).clone(), reference)]
            if cfg.split_k == 1:
                checks.append(("gemv_rmsnorm", gemv_rmsnorm(p.w(0), p.h, p.g, p.out, cfg).clone(),
                               F.linear(normed.float(), p.w(0).float())))
            for kernel, out, ref in checks:
                error = relative_error(out, ref)
                print(f"  {kernel:12} {shape.name:6} N={shape.n:3} K={shape.k:3} {cfg.label:16} rel err {error:.1e}")
                if not error < 2e-3:  # fp16 output rounding alone is <= 2**-11 of the largest
                    problems.append(f"{kernel} {shape} {cfg.label}: relative error {error}")
    if split_ran < 4:
        problems.append(f"only {split_ran} split-K runs")
    return problems


def check_pipeline(device: torch.device) -> list[str]:
    """The whole GPU run's logic, on tiny Phi-3-named shapes with a few configs and the wall clock."""
    shapes = (Shape("qkv", 96, 256), Shape("o", 32, 256), Shape("gate_up", 128, 256), Shape("down", 32, 512),
              Shape("lm_head", 80, 256))
    configs = [Config(2, 128, 1), Config(4, 128, 2), Config(8, 256, 1), Config(8, 256, 1, reduce_each=True)]
    results: dict = {}
    run(shapes, configs, device, CpuTimer(runs=2, warmup=1), 1 << 16, 1 << 22, results)
    print_tables(results)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "probe.json"
        write_json(results, str(path))
        loaded = json.loads(path.read_text())
    problems = [f"failed: {failure}" for failure in loaded["failures"]]
    problems += [f"{name}: not ok" for name, r in {**loaded["shapes"], **loaded["rmsnorm"]}.items() if not r.get("ok")]
    problems += [f"{name}: no split-K result" for name in SPLIT_SHAPES if not loaded["shapes"][name].get("best_splitk")]
    if len(loaded["decode_step"]["totals"]) != 5:
        problems.append(f"decode totals: {sorted(loaded['decode_step']['totals'])}")
    return problems


def selftest() -> int:
    device = torch.device("cpu")
    torch.manual_seed(0)
    problems = check_kernels(device)
    problems += check_pipeline(device)
    print("selftest: OK" if not problems else "selftest: FAILED\n  " + "\n  ".join(problems))
    return 0 if not problems else 1


def write_json(results: dict, path: Optional[str]) -> None:
    if path:
        Path(path).write_text(json.dumps(results, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write every figure here")
    parser.add_argument("--selftest", action="store_true", help="check the kernels and the run on CPU (interpreter)")
    args = parser.parse_args()
    if args.selftest:
        return selftest()
    if not torch.cuda.is_available():
        print("gpu_gemv_probe: no CUDA GPU (use --selftest to check the kernels on CPU)")
        return 2
    results: dict = {}
    try:
        run(PHI3_MINI, sweep_configs(), torch.device("cuda"), CudaTimer(runs=50, warmup=10), ROTATE_BYTES,
            BANDWIDTH_BYTES, results)
        print_tables(results)
    except Exception:
        results["error"] = traceback.format_exc()
        raise
    finally:
        write_json(results, args.json)
    return 0 if all(r.get("ok") for r in {**results["shapes"], **results["rmsnorm"]}.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
