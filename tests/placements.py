"""Engine options that force a given placement of a checkpoint (found with the real planner)."""

from llmrun.engine.build import EngineOptions
from llmrun.model.config import read_config_json
from llmrun.plan.make import PlanRequest, make_plan
from llmrun.plan.placement import PlanError, Tier
from llmrun.weights.index import build_index


def _disk_layers(folder, cpu_bytes, **kwargs):
    request = PlanRequest(gpu_mem_bytes=0, cpu_mem_bytes=cpu_bytes, **kwargs)
    try:
        placement = make_plan(read_config_json(folder), build_index(folder), request).placement
    except PlanError:
        return None, None
    return sum(t is Tier.DISK for t in placement.layer_tiers), placement


def _search(lo: int, hi: int, good) -> int:
    """Smallest value in (lo, hi] for which the monotone predicate `good` holds."""
    while hi - lo > 256:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if good(mid) else (mid, hi)
    return hi


def cpu_budget_streaming(folder, *, head_on_disk: bool = False, **kwargs) -> int:
    """The largest CPU budget at which at least half the layers (and optionally the head) stream."""
    num_layers = read_config_json(folder)["num_hidden_layers"]
    top = 1 << 34
    smallest = _search(0, top, lambda b: _disk_layers(folder, b, **kwargs)[0] is not None)

    def streams_enough(budget):
        count, placement = _disk_layers(folder, budget, **kwargs)
        return count >= (num_layers + 1) // 2 and (placement.head_tier is Tier.DISK or not head_on_disk)

    assert streams_enough(smallest), "no streaming placement exists"
    budget = _search(smallest, top, lambda b: not streams_enough(b)) - 256
    count, placement = _disk_layers(folder, budget, **kwargs)
    assert count and (placement.head_tier is Tier.DISK) == head_on_disk
    return budget


def placement_options(name: str, folder, dtype="float32", **kwargs) -> EngineOptions:
    """EngineOptions for a named placement: resident | disk | disk-head."""
    if name == "resident":
        return EngineOptions(dtype=dtype, gpu_mem_bytes=0, **kwargs)
    plan_kwargs = {k: v for k, v in kwargs.items() if k in ("ctx",)}
    if "max_num_seqs" in kwargs:
        plan_kwargs["batch"] = kwargs["max_num_seqs"]
    budget = cpu_budget_streaming(folder, head_on_disk=name == "disk-head", dtype=dtype, **plan_kwargs)
    return EngineOptions(dtype=dtype, gpu_mem_bytes=0, cpu_mem_bytes=budget, **kwargs)
