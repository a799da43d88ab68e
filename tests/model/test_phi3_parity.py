"""Phi-3 (4k, and Phi-4-mini's partial rotary) vs transformers on tiny random checkpoints."""

import pytest
import torch

from llmrun.engine.build import build_engine
from tests.checkpoints import phi3_config, save_checkpoint
from tests.model.test_llama_parity import DECODE_STEPS, PROMPT_LEN, prompt_ids, reference
from tests.parity import greedy_with_logits
from tests.placements import placement_options

VARIANTS = {
    "phi3-4k": dict(),
    "phi4-mini-partial-rotary": dict(partial_rotary_factor=0.75, num_key_value_heads=1, tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def checkpoint(request, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp(request.param), phi3_config(**VARIANTS[request.param]), seed=4)


@pytest.mark.parametrize("placement", ("resident", "disk"))
def test_phi3_logits_and_tokens_match_transformers(checkpoint, placement):
    prompt = prompt_ids(7, PROMPT_LEN)
    ref_tokens, ref_logits = reference(checkpoint, prompt, DECODE_STEPS)
    engine = build_engine(checkpoint, placement_options(placement, checkpoint))
    tokens, logits = greedy_with_logits(engine, prompt, DECODE_STEPS)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
