"""`llmrun run <folder> --raw -t 0 -n 16 --json` on a tiny checkpoint of each family equals
transformers' greedy generation (one subprocess per family)."""

import json

import pytest
import torch

from tests.checkpoints import (
    gemma2_config, gemma3_config, longrope_parameters, mistral_config, phi3_config, qwen2_config, qwen3_config,
    save_checkpoint,
)
from tests.cli.helpers import run_cli

# 27 tokens: past the 16-token windows; LongRoPE's 32 original positions are passed while decoding.
PROMPT = "The capital of France is Paris. Hello, how are you today?"
FAMILIES = {
    "mistral": mistral_config,
    "qwen2": qwen2_config,
    "qwen3": qwen3_config,
    "phi3-longrope": lambda: phi3_config(original_max_position_embeddings=32,
                                         rope_scaling=longrope_parameters(16)),
    "gemma2": gemma2_config,
    "gemma3": gemma3_config,
}


def transformers_greedy(folder, text, n):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return ids, out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_run_json_gives_transformers_greedy_tokens(family, tmp_path):
    folder = save_checkpoint(tmp_path / family, FAMILIES[family](), seed=22)
    proc = run_cli(["run", folder, PROMPT, "--raw", "-t", "0", "-n", "16", "--dtype", "float32", "--json"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    ids, expected = transformers_greedy(folder, PROMPT, 16)
    assert result["prompt_tokens"] == len(ids) > 16
    assert result["tokens"] == expected
    assert len(expected) == 16  # seed 22: no early EOS, so LongRoPE switches tables mid-run
