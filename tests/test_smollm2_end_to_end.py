"""The real SmolLM2-135M-Instruct through the whole path: CLI, chat template, every placement."""

import json
import sys

import pytest
import torch

from tests.cli.helpers import run_cli

pytestmark = pytest.mark.slow
QUESTION = "What is the capital of France? Answer in one sentence."


def run_json(home, tmp_path, *args, stdin=None):
    proc = run_cli(["run", "smollm2", QUESTION, "-t", "0", "-n", "32", "--json", *args], tmp_path,
                   stdin=stdin, LLMRUN_HOME=home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def transformers_tokens(folder, dtype, n=32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return ids.shape[1], out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_greedy_tokens_equal_transformers(smollm2_home, smollm2_dir, tmp_path, dtype):
    result = run_json(smollm2_home, tmp_path, *(["--dtype", dtype] if dtype else []))
    prompt_len, expected = transformers_tokens(smollm2_dir, result["dtype"])
    assert result["prompt_tokens"] == prompt_len
    assert result["tokens"] == expected
    assert "Paris" in result["text"]


def test_disk_streamed_and_batched_runs_give_the_resident_tokens(smollm2_home, tmp_path):
    resident = run_json(smollm2_home, tmp_path, "--ctx", "512")
    streamed = run_json(smollm2_home, tmp_path, "--ctx", "512", "--cpu-mem", "150MB")
    assert streamed["memory"]["layer_tiers"].count("disk") > 10
    assert streamed["memory"]["disk_reads"] == ("in place (mapped)" if sys.platform == "linux" else "copied (reader thread)")
    assert resident["memory"]["disk_reads"] is None
    assert streamed["tokens"] == resident["tokens"]
    lines = [QUESTION, "Name three colours.", QUESTION]
    proc = run_cli(["run", "smollm2", "--each-line", "--batch", "3", "-t", "0", "-n", "32", "--ctx", "512",
                    "--cpu-mem", "150MB"], tmp_path, stdin="\n".join(lines), LLMRUN_HOME=smollm2_home)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows[0]["tokens"] == rows[2]["tokens"] == resident["tokens"]
