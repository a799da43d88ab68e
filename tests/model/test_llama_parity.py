"""Native Llama decoder vs transformers on tiny random checkpoints (fp32 logits, greedy tokens)."""

import pytest
import torch

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.sampler import SamplingParams
from llmrun.plan.tiers import Tier
from tests.checkpoints import llama_config, save_checkpoint
from tests.parity import batched_and_alone, greedy_with_logits
from tests.placements import placement_options

VARIANTS = {
    "gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha-tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "mqa-llama3-rope": dict(
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        rope_theta=500000.0,
    ),
}
PROMPT_LEN, DECODE_STEPS = 40, 24
PLACEMENTS = ("resident", "disk", "disk-head", "disk-floor")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    return save_checkpoint(folder, llama_config(**VARIANTS[request.param]), seed=3)


def reference(folder, prompt, steps):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                         min_new_tokens=steps, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    with torch.no_grad():  # teacher-forced logits at every generated position
        logits = model(out).logits[0, len(prompt) - 1 : -1]
    return tokens, logits


def assert_staged_by_matrix(engine):
    placement, weights = engine.plan.placement, engine.weights
    assert placement.head_tier is Tier.DISK
    assert placement.staging_piece_bytes < max(placement.sizes.layer_bytes)
    assert weights.vectors and len(weights.unit_pieces[weights.head_unit]) > 1


def prompt_ids(seed, length, vocab=320):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=gen).tolist()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_logits_and_greedy_tokens_match_transformers(checkpoint, placement):
    prompt = prompt_ids(0, PROMPT_LEN)
    ref_tokens, ref_logits = reference(checkpoint, prompt, DECODE_STEPS)
    engine = build_engine(checkpoint, placement_options(placement, checkpoint))
    if placement != "resident":
        assert Tier.DISK in engine.plan.placement.layer_tiers
    if placement == "disk-floor":  # layers staged matrix by matrix, the head in vocabulary chunks
        assert_staged_by_matrix(engine)
    tokens, logits = greedy_with_logits(engine, prompt, DECODE_STEPS)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_a_tied_config_whose_checkpoint_has_its_own_lm_head_runs_that_head(tmp_path, monkeypatch):
    """tie_word_embeddings true, yet lm_head.weight stored with values of its own: transformers then does
    not tie them (it warns) and projects with the file's lm_head; so do llmrun's plan and decoder, in
    16 bits and with the head compressed on load (the lm_head compressed, the embeddings left alone)."""
    from safetensors.torch import load_file, save_file

    from llmrun.quant.format import QuantWeight

    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    folder = save_checkpoint(tmp_path / "both", llama_config(**VARIANTS["mha-tied"]), seed=3)
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(file)
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = torch.randn(tensors["model.embed_tokens.weight"].shape,
                                            generator=torch.Generator().manual_seed(9)) * 0.05
    save_file(tensors, file, metadata={"format": "pt"})
    prompt = prompt_ids(0, PROMPT_LEN)
    ref_tokens, ref_logits = reference(folder, prompt, 8)
    for placement in ("resident", "disk-head"):
        engine = build_engine(folder, placement_options(placement, folder))
        assert not engine.plan.placement.sizes.tied_embeddings
        tokens, logits = greedy_with_logits(engine, prompt, 8)
        assert tokens == ref_tokens
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    engine = build_engine(folder, EngineOptions(gpu_mem_bytes=0, dtype="float32", quant="int8"))
    head = engine.weights.resident[engine.weights.head_unit]["head"]
    assert isinstance(head, QuantWeight) and engine.weights._embed_table is not head
    tokens, logits = greedy_with_logits(engine, prompt, 8)
    assert (logits - ref_logits).abs().max() < 0.1 * ref_logits.abs().max()  # int8: close, not exact


@pytest.mark.parametrize("placement", ("resident", "disk"))
def test_batched_prompts_of_different_lengths_match_each_alone(checkpoint, placement):
    prompts = [prompt_ids(seed, length) for seed, length in ((1, 5), (2, 33), (3, 17), (4, 1))]
    engine = build_engine(checkpoint, placement_options(placement, checkpoint, batch=4))
    together, alone = batched_and_alone(engine, prompts, 12)
    assert together == alone
    assert all(len(t) == 12 for t in together)
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks  # all blocks returned


@pytest.mark.parametrize("placement", ("resident", "disk-head"))
def test_chunked_prefill_matches_single_prefill(checkpoint, placement):
    prompt = prompt_ids(5, 70)
    params = SamplingParams(temperature=0, max_new_tokens=8)
    whole = build_engine(checkpoint, EngineOptions(dtype="float32", gpu_mem_bytes=0))
    [alone] = whole.generate([prompt], params).run_to_end()
    chunked = build_engine(checkpoint, placement_options(placement, checkpoint))
    chunked.max_prefill_tokens = 16  # five prefill chunks, each attending to the cached ones
    [in_chunks] = chunked.generate([prompt], params).run_to_end()
    assert in_chunks.tokens == alone.tokens
