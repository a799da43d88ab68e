"""Engine options that force a given placement of a checkpoint (found with the real planner)."""

from llmrun.engine.build import EngineOptions
from llmrun.model.config import read_config_json
from llmrun.plan.make import PlanRequest, make_plan
from llmrun.plan.tiers import PlanError, Tier
from llmrun.weights.index import build_index

TOP = 1 << 36


def _placement(folder, gpu, cpu, **kwargs):
    request = PlanRequest(gpu_mem_bytes=gpu, cpu_mem_bytes=cpu, **kwargs)
    try:
        return make_plan(read_config_json(folder), build_index(folder), request).placement
    except PlanError:
        return None


def _search(lo: int, hi: int, good) -> int:
    """Smallest value in (lo, hi] for which the monotone predicate `good` holds."""
    while hi - lo > 256:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if good(mid) else (mid, hi)
    return hi


def streaming_budget(folder, slow: Tier, *, gpu=None, head_slow: bool = False, **kwargs) -> int:
    """The largest budget (GPU when slow is CPU, else CPU) at which at least half the layers are in
    `slow`, and the output head too when `head_slow` (otherwise the head stays faster)."""
    num_layers = read_config_json(folder)["num_hidden_layers"]

    def placed(budget):
        if slow is Tier.CPU:
            return _placement(folder, budget, TOP, **kwargs)
        return _placement(folder, gpu if gpu is not None else 0, budget, **kwargs)

    def enough(budget):
        p = placed(budget)
        return (p is not None and sum(t is slow for t in p.layer_tiers) >= (num_layers + 1) // 2
                and (p.head_tier is slow or not head_slow))

    smallest = _search(0, TOP, lambda b: placed(b) is not None)
    assert enough(smallest), "no streaming placement exists"
    budget = _search(smallest, TOP, lambda b: not enough(b)) - 256
    assert (placed(budget).head_tier is slow) == head_slow
    return budget


def floor_budget(folder, *, gpu: int = 0, **kwargs) -> int:
    """The smallest CPU budget (to 256 bytes) in which the checkpoint plans (GPU budget `gpu`)."""
    return _search(0, TOP, lambda budget: _placement(folder, gpu, budget, **kwargs) is not None)


def placement_options(name: str, folder, dtype="float32", **kwargs) -> EngineOptions:
    """EngineOptions for a named placement.

    CPU compute: resident | disk | disk-head | disk-floor (the smallest budget that plans: layers
    staged matrix by matrix, the head in chunks). GPU compute: gpu | gpu-cpu (layers streamed from
    pinned memory) | gpu-disk (from disk through pinned buffers).
    """
    plan_kwargs = {"dtype": dtype, **{k: kwargs[k] for k in ("ctx", "batch", "quant") if k in kwargs}}
    if name == "resident":
        return EngineOptions(dtype=dtype, gpu_mem_bytes=0, **kwargs)
    if name == "disk-floor":
        budget = floor_budget(folder, **plan_kwargs)
        return EngineOptions(dtype=dtype, gpu_mem_bytes=0, cpu_mem_bytes=budget, **kwargs)
    if name in ("disk", "disk-head"):
        budget = streaming_budget(folder, Tier.DISK, head_slow=name == "disk-head", **plan_kwargs)
        return EngineOptions(dtype=dtype, gpu_mem_bytes=0, cpu_mem_bytes=budget, **kwargs)
    if name == "gpu":
        return EngineOptions(dtype=dtype, **kwargs)
    gpu_budget = streaming_budget(folder, Tier.CPU, **plan_kwargs)
    if name == "gpu-cpu":
        return EngineOptions(dtype=dtype, gpu_mem_bytes=gpu_budget, cpu_mem_bytes=TOP, **kwargs)
    assert name == "gpu-disk", name
    cpu_budget = streaming_budget(folder, Tier.DISK, gpu=gpu_budget, **plan_kwargs)
    return EngineOptions(dtype=dtype, gpu_mem_bytes=gpu_budget, cpu_mem_bytes=cpu_budget, **kwargs)
