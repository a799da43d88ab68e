"""Every supported family vs transformers on tiny random checkpoints: fp32 logits and greedy tokens
over a prompt and decode steps, resident and disk-streamed (sliding windows, LongRoPE, soft-caps)."""

import pytest
import torch

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.sampler import SamplingParams
from llmrun.plan.tiers import Tier
from tests.checkpoints import (
    gemma2_config, gemma3_config, longrope_parameters, mistral_config, phi3_config, qwen2_config, qwen3_config,
    save_checkpoint,
)
from tests.model.test_llama_parity import assert_staged_by_matrix, prompt_ids
from tests.placements import placement_options

LONGROPE = dict(original_max_position_embeddings=32, rope_scaling=longrope_parameters(16))
# name -> (config, prompt length); every prompt (40) is longer than the 16-token windows.
VARIANTS = {
    "mistral-window": (lambda: mistral_config(), 40),
    "qwen2-sliding-layers": (lambda: qwen2_config(), 40),
    "qwen3": (lambda: qwen3_config(), 40),
    "phi3-4k-window": (lambda: phi3_config(sliding_window=16), 40),
    # The prompt is beyond the original 32 positions: long factors from the first token.
    "phi3-128k-longrope": (lambda: phi3_config(**LONGROPE), 40),
    # The prompt fits in 32 positions, the decode steps cross them: short, then long factors.
    "phi3.5-longrope-crossing": (lambda: phi3_config(**LONGROPE), 20),
    "phi4-mini-partial-longrope": (lambda: phi3_config(
        partial_rotary_factor=0.75, num_key_value_heads=1, tie_word_embeddings=True,
        original_max_position_embeddings=32, rope_scaling=longrope_parameters(12)), 40),
    "gemma2": (lambda: gemma2_config(), 40),
    "gemma3": (lambda: gemma3_config(), 40),
}
DECODE_STEPS = 24


def generate_reference(folder, prompt, steps):
    """transformers' greedy tokens and the logits of each generation step (its own cache and
    sliding-window cache layers; Phi-3's cache reset at the LongRoPE switch included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # run all steps, never suppress a token
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, folder, prompt, reference tokens, reference logits), built once per variant."""
    make_config, prompt_len = VARIANTS[request.param]
    folder = save_checkpoint(tmp_path_factory.mktemp(request.param), make_config(), seed=5)
    prompt = prompt_ids(13, prompt_len)
    return (request.param, folder, prompt, *generate_reference(folder, prompt, DECODE_STEPS))


def run_engine(engine, prompts, steps, on_logits=None):
    engine.eos_ids = frozenset()  # compare every step even if the random model emits EOS
    params = SamplingParams(temperature=0, max_new_tokens=steps)
    return [r.tokens for r in engine.generate(prompts, params, on_logits=on_logits).run_to_end()]


def static_decode(engine):
    """Decode steps through the static-shape path that CUDA graphs capture (engine/graphs.py),
    run eagerly: the same tensors and masks a graph replays, checkable on the CPU."""
    from llmrun.engine.graphs import StaticDecode

    runner = engine.runner
    runner.static = StaticDecode(engine.decoder, runner.weights, engine.cache, engine.max_num_seqs,
                                 engine.max_context, capture=False)
    return engine


@pytest.mark.parametrize("placement", ("resident", "disk", "disk-floor", "static-decode"))
def test_logits_and_greedy_tokens_match_transformers(variant, placement):
    _, folder, prompt, ref_tokens, ref_logits = variant
    if placement == "static-decode":
        engine = static_decode(build_engine(folder, placement_options("resident", folder)))
    else:
        engine = build_engine(folder, placement_options(placement, folder))
    if placement == "disk":
        assert Tier.DISK in engine.plan.placement.layer_tiers
    if placement == "disk-floor":  # every family's layer asks for its matrices in its layout's order
        assert_staged_by_matrix(engine)
    ours = []
    tokens = run_engine(engine, [prompt], DECODE_STEPS, lambda idx, logits: ours.append(logits[0].clone()))
    assert tokens == [ref_tokens]
    torch.testing.assert_close(torch.stack(ours), ref_logits, atol=1e-4, rtol=1e-4)
    if placement == "static-decode":  # the decode steps ran static (the 20-token prompt: in 2 buckets)
        shapes = engine.runner.static.graphs
        assert {rows for rows, _, _ in shapes} == {1} and len(shapes) >= 1 + (len(prompt) == 20), shapes


@pytest.mark.parametrize("static", (False, True), ids=("dynamic", "static-decode"))
@pytest.mark.parametrize("variant", ("gemma2", "phi3.5-longrope-crossing", "qwen2-sliding-layers"), indirect=True)
def test_batched_prompts_match_each_alone(variant, static):
    """Per-sequence windows (with soft-capped decode masks) and LongRoPE tables: of these prompts,
    30 crosses the 32 original positions while decoding and 40 starts long. Static decode steps
    pad rows of different lengths to one bucket of blocks; a row on the other RoPE table runs eagerly."""
    name, folder, *_ = variant
    prompts = [prompt_ids(seed, length) for seed, length in ((1, 5), (2, 30), (3, 17), (4, 40))]
    engine = build_engine(folder, EngineOptions(dtype="float32", gpu_mem_bytes=0, batch=4))
    if static:
        static_decode(engine)
    together = run_engine(engine, prompts, 12)
    assert together == [run_engine(engine, [prompt], 12)[0] for prompt in prompts]
    if static:  # together and alone ran static, but for rows on two RoPE tables at once
        rows = {rows for rows, _, _ in engine.runner.static.graphs}
        assert rows == ({1} if name.startswith("phi3.5") else {1, 4}), rows
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


@pytest.mark.parametrize("variant", ("mistral-window", "phi3-128k-longrope", "phi3.5-longrope-crossing", "gemma3"),
                         indirect=True)
def test_chunked_prefill_still_matches_transformers(variant):
    """Prefill in chunks of 8: window masks span chunks, LongRoPE picks its table by the whole
    prompt, and the recomputation at the LongRoPE switch runs in chunks too."""
    _, folder, prompt, ref_tokens, ref_logits = variant
    engine = build_engine(folder, EngineOptions(dtype="float32", gpu_mem_bytes=0))
    engine.max_prefill_tokens = 8
    ours = []
    tokens = run_engine(engine, [prompt], DECODE_STEPS, lambda idx, logits: ours.append(logits[0].clone()))
    assert tokens == [ref_tokens]
    torch.testing.assert_close(torch.stack(ours), ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ("phi3.5-longrope-crossing",), indirect=True)
def test_kept_longrope_sequence_recomputes_once_it_needs_the_long_table(variant):
    """A conversation whose next prompt passes the original 32 positions cannot reuse K/V rotated
    with the short factors; once long, later turns reuse the cache again. Each turn equals a fresh run."""
    _, folder, *_ = variant
    chat, fresh = (build_engine(folder, EngineOptions(dtype="float32", gpu_mem_bytes=0)) for _ in range(2))
    kept, ids = chat.keep_sequence(), prompt_ids(8, 12)
    chat.eos_ids = frozenset()
    # 16 tokens (short), then 34 (past 32: the short cache is dropped), then 47 (the long cache is reused)
    for extra, can_reuse in ((prompt_ids(9, 4), False), (prompt_ids(10, 10), False), (prompt_ids(11, 5), True)):
        ids = ids + extra
        [turn] = chat.generate([ids], SamplingParams(temperature=0, max_new_tokens=8), kept=[kept]).run_to_end()
        assert (turn.prefilled_tokens < len(ids)) == can_reuse
        assert turn.tokens == run_engine(fresh, [ids], 8)[0]
        ids = ids + turn.tokens
    chat.release(kept)
