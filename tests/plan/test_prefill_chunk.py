"""The prefill chunk is the plan's choice: the largest where nothing streams, a smaller one where its
smaller workspace keeps enough more layers resident (CHUNK_SAVING a halving), the smallest at the
floor; the engine runs the chunk its plan reserved for."""

from dataclasses import replace

import pytest

from llmrun.plan.model_sizes import ModelSizes
from llmrun.plan.placement import CHUNK_SAVING, plan, smallest_budget, workspace_bytes
from llmrun.plan.tiers import PREFILL_CHUNKS, Budgets, PlanOptions, Tier

MB = 1_000_000
C = Tier.CPU


def shaped(num_layers=30, layer=int(2.65 * MB), head=int(56.6 * MB), hidden=576, intermediate=1536):
    """SmolLM2-135M in int4 (bf16 activations, the tied head in 16 bits), in round numbers."""
    return ModelSizes(
        layer_bytes=(layer,) * num_layers, embed_bytes=head, lm_head_bytes=0, other_bytes=2000,
        tied_embeddings=True, kv_bytes_per_token=23_040, hidden_size=hidden, intermediate_size=intermediate,
        vocab_size=49152, num_attention_heads=9, max_context=8192, dtype_bytes=2,
        layer_matrix_bytes=(layer // 3,) * num_layers, layer_vector_bytes=(2304,) * num_layers,
    )


OPTIONS = PlanOptions(ctx=1024, dtype_bytes=2, batch=2)


def pinned(chunk):
    return replace(OPTIONS, prefill_chunks=(chunk,))


def cpu(budget):
    return Budgets(gpu_bytes=None, cpu_bytes=budget)


def reserved(placement, name):
    return next(r.num_bytes for r in placement.reservations if r.name == name)


def test_an_ample_budget_keeps_the_largest_chunk():
    placement = plan(shaped(), cpu(10**10), OPTIONS)
    assert placement.prefill_chunk == PREFILL_CHUNKS[0] and not placement.streams
    assert reserved(placement, "workspace") == workspace_bytes(shaped(), OPTIONS, C, PREFILL_CHUNKS[0])


def test_a_short_context_caps_the_chunk():
    placement = plan(shaped(), cpu(10**10), replace(OPTIONS, ctx=100))
    assert placement.prefill_chunk == 100


def test_a_tight_budget_takes_a_smaller_chunk_that_keeps_more_layers_resident():
    """SmolLM2 int4 under --cpu-mem 150MB (ctx 1024, 2 sequences): 512-token chunks' 41 MB of
    activations left no layer resident."""
    sizes, budget = shaped(), 150 * MB
    chosen = plan(sizes, cpu(budget), OPTIONS)
    at_512 = plan(sizes, cpu(budget), pinned(512))
    assert chosen.prefill_chunk < 512
    assert chosen.layer_tiers.count(C) > at_512.layer_tiers.count(C)
    assert chosen.streamed_bytes() <= (1 - CHUNK_SAVING) * at_512.streamed_bytes()
    assert reserved(chosen, "workspace") == workspace_bytes(sizes, OPTIONS, C, chosen.prefill_chunk)
    assert chosen.total_bytes(C) <= budget


@pytest.mark.parametrize("resident, expected", [(10, 512), (30, 256)])
def test_one_more_resident_layer_is_worth_a_halving_only_above_the_saving(resident, expected):
    """40 layers of 100 MB: a budget where 256-token chunks keep one layer more than 512-token ones
    (and smaller chunks no more than that). With 10 resident that saves 1/30 of the streamed bytes
    (< CHUNK_SAVING: the larger chunk stays), with 30 resident 1/10 (the smaller chunk is taken)."""
    sizes = shaped(num_layers=40, layer=100 * MB, head=20 * MB, hidden=4096, intermediate=11008)
    staging = reserved(plan(sizes, cpu(10**9), pinned(256)), "staging")
    kv = reserved(plan(sizes, cpu(10**9), pinned(256)), "kv_cache")
    budget = kv + workspace_bytes(sizes, OPTIONS, C, 256) + staging + sizes.head_bytes + 2000 + (resident + 1) * 100 * MB
    assert plan(sizes, cpu(budget), pinned(512)).layer_tiers.count(C) == resident
    assert all(plan(sizes, cpu(budget), pinned(c)).layer_tiers.count(C) == resident + 1 for c in (256, 128, 64))
    assert plan(sizes, cpu(budget), OPTIONS).prefill_chunk == expected


def test_the_floor_is_planned_with_the_smallest_chunk():
    sizes = shaped()
    floor = smallest_budget(sizes, cpu(1), OPTIONS)
    assert floor == smallest_budget(sizes, cpu(1), pinned(PREFILL_CHUNKS[-1]))
    assert floor < smallest_budget(sizes, cpu(1), pinned(512))
    assert plan(sizes, cpu(floor), OPTIONS).prefill_chunk == PREFILL_CHUNKS[-1]


def test_the_engine_runs_the_chunk_its_plan_reserved_for(tmp_path):
    """At its floor a checkpoint plans 64-token chunks: a 150-token prompt takes three prefill steps
    there (one with the whole budget) and gives the same greedy tokens."""
    from llmrun.engine.build import EngineOptions, engine_from_plan
    from llmrun.engine.sampler import SamplingParams
    from llmrun.plan.inputs import folder_inputs
    from llmrun.plan.make import make_plan
    from llmrun.weights.observer import StepObserver
    from tests.checkpoints import llama_config, save_checkpoint
    from tests.placements import floor_budget

    class Steps(StepObserver):
        watches_layers = True
        count = 0

        def step_done(self):
            self.count += 1

    folder = save_checkpoint(tmp_path / "tiny", llama_config(), seed=4)
    prompt, params = list(range(3, 153)), SamplingParams(temperature=0, max_new_tokens=4)
    runs = {}
    for name, budget in (("floor", floor_budget(folder, dtype="float32", ctx=256)), ("whole", None)):
        inputs, observer = folder_inputs(folder), Steps()
        options = EngineOptions(dtype="float32", gpu_mem_bytes=0, cpu_mem_bytes=budget, ctx=256)
        with engine_from_plan(inputs, make_plan(inputs.config, inputs.index, options, folder), options,
                              step_observer=observer) as engine:
            engine.eos_ids = frozenset()
            [result] = engine.generate([prompt], params).run_to_end()
            runs[name] = (engine.plan.placement.prefill_chunk, engine.max_prefill_tokens, observer.count, result.tokens)
    assert runs["floor"][:3] == (64, 64, 3 + 3) and runs["whole"][:3] == (256, 256, 1 + 3)
    assert runs["floor"][3] == runs["whole"][3]


def test_plan_json_names_the_chunk_and_sizes_the_workspace_for_it(smollm2_home, tmp_path):
    import json

    from tests.cli.helpers import run_cli

    def planned(*args):
        proc = run_cli(["plan", "smollm2", "--json", "--gpu-mem", "0", "--dtype", "bfloat16", *args], tmp_path,
                       LLMRUN_HOME=smollm2_home)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        workspace = next(r for r in data["reservations"] if r["name"] == "workspace")
        assert workspace["detail"].startswith(f"activations for a {data['prefill_chunk']}-token prefill chunk")
        return data

    assert planned("--ctx", "1024")["prefill_chunk"] == 512
    tight = planned("--quant", "int4", "--cpu-mem", "150MB", "--ctx", "1024", "--batch", "2")
    assert tight["prefill_chunk"] < 512 and "cpu" in tight["layer_tiers"] and "disk" in tight["layer_tiers"]
