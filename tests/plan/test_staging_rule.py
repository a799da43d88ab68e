"""The staging rule: two slots of whole layers wherever they fit, of single matrices where they do
not, the head streamed in chunks of a slot's size, so the floor is about twice the largest matrix."""

from dataclasses import replace

import pytest

from llmrun.plan.model_sizes import ModelSizes
from llmrun.plan.placement import plan, smallest_budget, workspace_bytes
from llmrun.plan.tiers import Budgets, PlanError, PlanOptions, Tier

MB = 1_000_000
C, D = Tier.CPU, Tier.DISK


def shaped(num_layers=30, layer=14 * MB, matrix=7 * MB, vectors=4000, head=113 * MB):
    """SmolLM2-135M's float32 shape in round numbers: a tied head eight layers big."""
    return ModelSizes(
        layer_bytes=(layer,) * num_layers, embed_bytes=head, lm_head_bytes=0, other_bytes=2000,
        tied_embeddings=True, kv_bytes_per_token=46_080, hidden_size=576, intermediate_size=1536,
        vocab_size=49152, num_attention_heads=9, max_context=8192, dtype_bytes=4,
        layer_matrix_bytes=(matrix,) * num_layers, layer_vector_bytes=(vectors,) * num_layers,
    )


OPTIONS = PlanOptions(ctx=512, dtype_bytes=4, prefill_chunks=(512,))  # the chunk's choice: test_prefill_chunk.py


def fixed(sizes):
    return -(-OPTIONS.ctx // 16) * 16 * sizes.kv_bytes_per_token + workspace_bytes(sizes, OPTIONS, C)


def staging(placement):
    return next(r for r in placement.reservations if r.name == "staging")


def head_and_slots(sizes):
    return fixed(sizes) + sizes.head_bytes + sizes.other_bytes


def test_whole_layers_are_staged_wherever_they_fit():
    """Even where single matrices would keep one more layer resident: each piece handed over costs a
    step a wait (SmolLM2 bf16 at 150MB decoded ~12 % slower by matrices)."""
    sizes = shaped()
    more = plan(sizes, Budgets(gpu_bytes=None, cpu_bytes=head_and_slots(sizes) + 28 * MB + 105 * MB), OPTIONS)
    assert more.head_tier is C and more.staging_piece_bytes == 14 * MB
    assert staging(more).num_bytes == 2 * 14 * MB
    assert more.layer_tiers.count(C) == 7  # matrix slots would have left room for 8


def test_a_tight_budget_streams_the_head_in_chunks_and_stages_what_fits():
    sizes = shaped()
    budget = 150 * MB  # issue 18: refused before (the 113 MB head was staged whole, twice)
    placement = plan(sizes, Budgets(gpu_bytes=None, cpu_bytes=budget), OPTIONS)
    assert placement.head_tier is D and placement.embed_tier is D
    assert placement.staging_piece_bytes == 14 * MB and staging(placement).num_bytes == 2 * 14 * MB
    assert placement.total_bytes(C) <= budget
    assert placement.layer_tiers.count(C) == (budget - fixed(sizes) - 2 * 14 * MB) // (14 * MB)
    # where two whole layers no longer fit, single matrices do
    tighter = fixed(sizes) + 2 * 14 * MB - 1
    by_matrix = plan(sizes, Budgets(gpu_bytes=None, cpu_bytes=tighter), OPTIONS)
    assert by_matrix.staging_piece_bytes == 7 * MB and staging(by_matrix).num_bytes == 2 * 7 * MB + 30 * 4000
    assert by_matrix.head_tier is D and by_matrix.total_bytes(C) <= tighter


def test_the_floor_is_twice_the_largest_matrix_above_kv_and_workspace():
    sizes = shaped()
    floor = smallest_budget(sizes, Budgets(gpu_bytes=None, cpu_bytes=1), OPTIONS)
    assert floor == fixed(sizes) + 2 * 7 * MB + 30 * 4000
    placement = plan(sizes, Budgets(gpu_bytes=None, cpu_bytes=floor), OPTIONS)
    assert set(placement.layer_tiers) == {D} and placement.head_tier is D
    with pytest.raises(PlanError, match="needs at least"):
        plan(sizes, Budgets(gpu_bytes=None, cpu_bytes=floor - 1), OPTIONS)


def test_a_compressed_head_is_never_streamed_the_floor_keeps_it():
    """A compressed head (--quant's int8, a kept GGUF's) runs from memory: the floor holds it beside
    the slots, and a budget below that has no plan (one line), where a float head would stream."""
    sizes = replace(shaped(head=30 * MB), head_compressed=True)
    floor = smallest_budget(sizes, Budgets(gpu_bytes=None, cpu_bytes=1), OPTIONS)
    assert floor == fixed(sizes) + 2 * 7 * MB + 30 * 4000 + sizes.head_bytes + sizes.other_bytes
    placement = plan(sizes, Budgets(gpu_bytes=None, cpu_bytes=floor), OPTIONS)
    assert placement.head_tier is C and set(placement.layer_tiers) == {D}
    with pytest.raises(PlanError, match="needs at least .* staging buffers, the compressed output head\\)"):
        plan(sizes, Budgets(gpu_bytes=None, cpu_bytes=floor - 1), OPTIONS)
    float_head = plan(replace(sizes, head_compressed=False), Budgets(gpu_bytes=None, cpu_bytes=floor - 1), OPTIONS)
    assert float_head.head_tier is D


def test_without_known_matrices_layers_stage_whole():
    sizes = replace(shaped(), layer_matrix_bytes=(), layer_vector_bytes=())
    floor = smallest_budget(sizes, Budgets(gpu_bytes=None, cpu_bytes=1), OPTIONS)
    assert floor == fixed(sizes) + 2 * 14 * MB


def test_more_memory_never_moves_the_head_or_while_it_stays_a_layer_to_a_slower_tier():
    sizes = shaped()
    previous = None
    for budget_mb in range(60, 700, 3):
        try:
            placement = plan(sizes, Budgets(gpu_bytes=None, cpu_bytes=budget_mb * MB), OPTIONS)
        except PlanError:
            continue
        assert placement.total_bytes(C) <= budget_mb * MB
        if previous is not None:
            assert not (previous.head_tier is C and placement.head_tier is D), budget_mb
            if previous.head_tier is placement.head_tier:
                assert placement.layer_tiers.count(C) >= previous.layer_tiers.count(C), budget_mb
        previous = placement
    assert previous.weight_bytes(C) == sizes.weight_bytes


GiB = 1 << 30


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory):
    from tests.checkpoints import llama_70b_config, save_sparse_checkpoint

    return save_sparse_checkpoint(tmp_path_factory.mktemp("llama-70b") / "llama-70b", llama_70b_config(),
                                  dtype="BF16", num_shards=4)


def test_70b_bf16_plans_in_4gb_of_gpu_and_runs_from_under_3gib(llama_70b, tmp_path):
    """Issue 18: whole 1.6 GiB layers staged twice needed 6.04 GiB; a matrix at a time, the head in
    chunks, it plans in 4 GB, and a 3 GiB budget (the floor is below it) plans too."""
    from tests.plan.test_plan_cli import plan_json

    data = plan_json(llama_70b, tmp_path, "--gpu-mem", "4GB", "--cpu-mem", "200GB", "--ctx", "512", "--dtype", "bfloat16")
    assert data["dtype"] == "bfloat16" and data["model"]["parameters"] > 69e9
    assert data["head_tier"] == "cpu" and "gpu" not in data["layer_tiers"]
    slots = next(r for r in data["reservations"] if r["name"] == "staging")
    gate_up = 2 * 28672 * 8192 * 2
    assert slots["bytes"] <= 2 * gate_up + 80 * 2 * 8192 * 2
    assert data["tiers"]["gpu"]["total_bytes"] <= 4 * 10**9
    at_3gib = plan_json(llama_70b, tmp_path, "--gpu-mem", "3GiB", "--cpu-mem", "200GB", "--ctx", "512",
                        "--dtype", "bfloat16")
    assert at_3gib["tiers"]["gpu"]["total_bytes"] <= 3 * GiB
