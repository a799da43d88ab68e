"""The planner as a pure function: toy byte sizes, exact tiers, and its properties."""

import pytest

from llmrun.plan.model_sizes import ModelSizes
from llmrun.plan.placement import plan, workspace_bytes
from llmrun.plan.tiers import Budgets, PlanError, PlanOptions, Tier

MB = 1_000_000
G, C, D = Tier.GPU, Tier.CPU, Tier.DISK


def toy(num_layers=8, layer=100 * MB, embed=50 * MB, lm_head=50 * MB, tied=False, kv_per_token=1000):
    return ModelSizes(
        layer_bytes=(layer,) * num_layers, embed_bytes=embed, lm_head_bytes=0 if tied else lm_head,
        other_bytes=1000, tied_embeddings=tied, kv_bytes_per_token=kv_per_token, hidden_size=64,
        intermediate_size=128, vocab_size=1000, num_attention_heads=4, max_context=8192, dtype_bytes=2,
    )


def options(ctx=1024, batch=1, runtime=100 * MB):
    return PlanOptions(ctx=ctx, dtype_bytes=2, batch=batch, block_size=16, gpu_runtime_bytes=runtime)


def fixed_gpu(sizes, opts):
    kv = -(-opts.ctx // 16) * 16 * opts.batch * sizes.kv_bytes_per_token
    return opts.gpu_runtime_bytes + kv + workspace_bytes(sizes, opts, G)


def test_everything_on_gpu_when_it_fits():
    sizes, opts = toy(), options()
    placement = plan(sizes, Budgets(gpu_bytes=2000 * MB, cpu_bytes=4000 * MB), opts)
    assert placement.layer_tiers == (G,) * 8
    assert placement.head_tier is G and placement.embed_tier is G
    assert not placement.streams
    assert [r.name for r in placement.reservations] == ["runtime", "kv_cache", "workspace"]


def test_exact_split_gpu_prefix_then_pinned_cpu():
    sizes, opts = toy(), options()
    # room for: fixed + staging (2 x 100 MB) + head (50 MB + 1000 B) + 3 layers, a little spare
    gpu = fixed_gpu(sizes, opts) + 200 * MB + 50 * MB + 1000 + 300 * MB + 10 * MB
    placement = plan(sizes, Budgets(gpu_bytes=gpu, cpu_bytes=4000 * MB), opts)
    assert placement.layer_tiers == (G, G, G, C, C, C, C, C)
    assert placement.head_tier is G
    assert placement.embed_tier is C
    assert placement.layer_ranges(G) == [(0, 3)] and placement.layer_ranges(C) == [(3, 8)]
    assert placement.streamed_bytes_per_token(C) == 500 * MB
    assert placement.total_bytes(G) <= gpu


def test_cpu_overflow_goes_to_disk_with_pinned_staging():
    sizes, opts = toy(), options()
    gpu = fixed_gpu(sizes, opts) + 200 * MB + 50 * MB + 1000 + 200 * MB
    placement = plan(sizes, Budgets(gpu_bytes=gpu, cpu_bytes=440 * MB), opts)
    # 440 MB CPU: 200 MB pinned staging leaves room for two 100 MB layers, not the embeddings
    assert placement.layer_tiers == (G, G, C, C, D, D, D, D)
    assert placement.total_bytes(C) <= 440 * MB
    assert placement.embed_tier is D


def test_gpu_mem_zero_plans_cpu_and_disk_only():
    sizes, opts = toy(), options()
    everything = plan(sizes, Budgets(gpu_bytes=0, cpu_bytes=4000 * MB), opts)
    assert set(everything.layer_tiers) == {C} and everything.compute_tier is C
    tight = plan(sizes, Budgets(gpu_bytes=None, cpu_bytes=600 * MB), opts)
    assert G not in tight.layer_tiers
    assert tight.layer_tiers == (C, C, C, D, D, D, D, D)
    assert tight.total_bytes(C) <= 600 * MB


def test_tied_embeddings_count_once_and_follow_the_head():
    sizes = toy(tied=True)
    placement = plan(sizes, Budgets(gpu_bytes=None, cpu_bytes=10_000 * MB), options())
    assert placement.weight_bytes(C) == 8 * 100 * MB + 50 * MB + 1000
    assert placement.embed_tier is placement.head_tier is C


@pytest.mark.parametrize("tied", [False, True])
def test_more_gpu_memory_never_moves_a_layer_to_a_slower_tier(tied):
    sizes, opts = toy(num_layers=12, layer=73 * MB, tied=tied), options()
    speed = {G: 0, C: 1, D: 2}
    previous = None
    for gpu_mb in range(300, 2500, 7):
        try:
            placement = plan(sizes, Budgets(gpu_bytes=gpu_mb * MB, cpu_bytes=500 * MB), opts)
        except PlanError:
            continue
        assert placement.total_bytes(G) <= gpu_mb * MB
        assert placement.total_bytes(C) <= 500 * MB
        tiers = placement.layer_tiers + (placement.head_tier,)
        if previous is not None:
            assert all(speed[new] <= speed[old] for new, old in zip(tiers, previous))
        previous = tiers


def test_kv_reservation_grows_with_ctx_times_batch():
    sizes = toy()
    budgets = Budgets(gpu_bytes=4000 * MB, cpu_bytes=4000 * MB)
    kv = {}
    for ctx, batch in ((512, 1), (1024, 1), (512, 2), (2048, 4)):
        placement = plan(sizes, budgets, options(ctx, batch))
        kv[(ctx, batch)] = next(r.num_bytes for r in placement.reservations if r.name == "kv_cache")
        assert placement.kv_tokens >= ctx * batch
    assert kv[(512, 1)] < kv[(1024, 1)] < kv[(2048, 4)]
    assert kv[(512, 2)] == kv[(1024, 1)] == 2 * kv[(512, 1)]


def test_context_that_does_not_fit_says_what_fits():
    sizes = toy(kv_per_token=200_000)
    with pytest.raises(PlanError, match=r"fits with --ctx \d+"):
        plan(sizes, Budgets(gpu_bytes=600 * MB, cpu_bytes=4000 * MB), options(ctx=8192))


def test_model_that_cannot_run_fails_with_numbers():
    with pytest.raises(PlanError, match="cannot run: .* needs at least .* of CPU memory"):
        plan(toy(layer=500 * MB), Budgets(gpu_bytes=None, cpu_bytes=600 * MB), options())


def test_ctx_beyond_model_maximum():
    with pytest.raises(PlanError, match="beyond the model's maximum context of 8192"):
        plan(toy(), Budgets(gpu_bytes=None, cpu_bytes=4000 * MB), options(ctx=10_000))
