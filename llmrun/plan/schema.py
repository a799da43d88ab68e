"""The stable JSON form of a plan (`llmrun plan --json`), documented in docs/plan-json.md."""

from __future__ import annotations

from llmrun.plan.make import PlanReport
from llmrun.plan.tiers import Tier

SCHEMA = "llmrun.plan/1"


def _holds(report: PlanReport, tier: Tier) -> list[str]:
    placement, holds = report.placement, []
    if placement.head_tier is tier:
        holds.append("embed+head" if placement.sizes.tied_embeddings else "lm_head")
    if not placement.sizes.tied_embeddings and placement.embed_tier is tier:
        holds.append("embed")
    return holds


def plan_to_json(report: PlanReport, name: str, path: str, architecture: str) -> dict:
    p, sizes, est = report.placement, report.placement.sizes, report.estimate
    budget = {Tier.GPU: p.budgets.gpu_bytes or 0, Tier.CPU: p.budgets.cpu_bytes, Tier.DISK: None}
    tiers = {}
    for tier in Tier:
        tiers[tier.value] = {
            "layers": [list(r) for r in p.layer_ranges(tier)],
            "num_layers": sum(1 for t in p.layer_tiers if t is tier),
            "holds": _holds(report, tier),
            "weight_bytes": p.weight_bytes(tier),
            "reserved_bytes": p.reserved_bytes(tier),
            "total_bytes": p.total_bytes(tier),
            "budget_bytes": budget[tier],
        }
    streamed = {t.value: p.streamed_bytes_per_token(t) for t in (Tier.CPU, Tier.DISK)}
    return {
        "schema": SCHEMA,
        "model": {"name": name, "path": path, "architecture": architecture, "num_layers": sizes.num_layers,
                  "parameters": sizes.num_parameters, "weight_bytes": sizes.weight_bytes},
        "dtype": report.dtype,
        "compute": p.compute_tier.value,
        "gpu_name": report.measured.gpu_name,
        "budgets": {
            "gpu_bytes": p.budgets.gpu_bytes or 0,
            "gpu_source": "override" if report.request.gpu_mem_bytes is not None else "measured",
            "cpu_bytes": p.budgets.cpu_bytes,
            "cpu_source": "override" if report.request.cpu_mem_bytes is not None else "measured",
            "disk_free_bytes": p.budgets.disk_bytes,
        },
        "ctx": p.ctx,
        "batch": p.batch,
        "prefill_chunk": p.prefill_chunk,
        "kv_cache": {"tier": p.kv_tier.value, "block_size": p.block_size, "num_blocks": p.num_kv_blocks,
                     "tokens": p.kv_tokens, "bytes_per_token": sizes.kv_bytes_per_token,
                     "bytes": next(r.num_bytes for r in p.reservations if r.name == "kv_cache")},
        "reservations": [{"name": r.name, "tier": r.tier.value, "bytes": r.num_bytes, "detail": r.detail}
                         for r in p.reservations],
        "layer_tiers": [t.value for t in p.layer_tiers],
        "head_tier": p.head_tier.value,
        "embed_tier": p.embed_tier.value,
        "tiers": tiers,
        "streamed_bytes_per_token": {**streamed, "total": p.streamed_bytes()},
        "floor": {"tier": report.floor_tier.value, "bytes": report.floor_bytes},
        "estimate": _estimate_json(est),
        "warnings": list(report.warnings),
    }


def _estimate_json(est) -> dict:
    step = est.figures["layer_step"]
    return {
        "decode_tok_s": {"low": round(est.decode_tok_s_low, 3), "high": round(est.decode_tok_s_high, 3),
                         "full_ctx": round(est.decode_tok_s_full_ctx, 3)},
        "prefill_tok_s": round(est.prefill_tok_s, 1),
        "bytes_per_token": est.bytes_per_token,
        "bandwidths": {k: {"bytes_per_s": round(v.value), "measured": v.measured, "source": v.source}
                       for k, v in est.figures.items() if k != "layer_step"},
        "layer_step_s": {"seconds": step.value, "measured": step.measured, "source": step.source},
        "page_cache": {"resident_fraction": est.resident_fraction, "warm_after_first_pass": est.disk_warm,
                       "first_read_s": round(est.first_read_s, 3)},
    }
