"""Every family on CUDA (sliding windows, LongRoPE, soft-caps), GPU-resident and CPU-streamed, equals
the CPU run (run by scripts/gpu_check.sh; skipped elsewhere).

The reference is llmrun's fp32 CPU run, which tests/model/test_family_parity.py pins to the
transformers of this repository's venv: the GPU machine may carry another transformers (5.17 runs
Gemma 2 through SDPA without attention soft-capping, and keeps Phi-3's short-factor cache past the
LongRoPE switch), so comparing with it there would test its version, not our CUDA paths.
"""

import pytest
import torch

from llmrun.engine.build import EngineOptions, build_engine
from tests.checkpoints import save_checkpoint
from tests.model.test_family_parity import DECODE_STEPS, VARIANTS
from tests.model.test_llama_parity import prompt_ids
from tests.parity import greedy_with_logits
from tests.placements import placement_options

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def greedy(folder, options, prompt):
    return greedy_with_logits(build_engine(folder, options), prompt, DECODE_STEPS)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    make_config, prompt_len = VARIANTS[request.param]
    folder = save_checkpoint(tmp_path_factory.mktemp(request.param), make_config(), seed=5)
    prompt = prompt_ids(13, prompt_len)
    return folder, prompt, *greedy(folder, EngineOptions(dtype="float32", gpu_mem_bytes=0), prompt)


@pytest.mark.parametrize("placement", ("gpu", "gpu-cpu"))
def test_cuda_families_match_the_cpu_run(variant, placement):
    folder, prompt, cpu_tokens, cpu_logits = variant
    tokens, logits = greedy(folder, placement_options(placement, folder), prompt)
    assert tokens == cpu_tokens
    torch.testing.assert_close(logits, cpu_logits, atol=2e-4, rtol=2e-4)
