"""The repetition penalty end to end: the engine's per-sequence mask of seen ids, kept up to date
step by step, gives transformers' greedy tokens under the same penalty."""

import torch

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.sampler import SamplingParams
from tests.checkpoints import llama_config, save_checkpoint
from tests.model.test_llama_parity import prompt_ids


def test_greedy_with_a_repetition_penalty_matches_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_checkpoint(tmp_path / "llama", llama_config(), seed=5)
    prompt = prompt_ids(3, 24)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                         repetition_penalty=1.8, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()

    engine = build_engine(folder, EngineOptions(dtype="float32", gpu_mem_bytes=0))
    engine.eos_ids = frozenset()
    params = SamplingParams(temperature=0, repetition_penalty=1.8, max_new_tokens=24)
    assert engine.generate([prompt], params).run_to_end()[0].tokens == expected
    plain = engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=24)).run_to_end()
    assert plain[0].tokens != expected  # the penalty changed something
