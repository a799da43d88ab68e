"""The real SmolLM2-135M-Instruct from the PyPI fallback: resolvable, a Llama with a chat template."""

import json

import pytest

from llmrun.hub import pull
from llmrun.hub.resolve import resolve_model
from tests.cli.helpers import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture()
def real_home(monkeypatch, smollm2_home):
    monkeypatch.setenv("LLMRUN_HOME", str(smollm2_home))
    return smollm2_home


def test_fixture_folder_resolves_as_a_llama_with_a_chat_template(real_home, smollm2_dir):
    from transformers import AutoTokenizer

    source = resolve_model("smollm2")
    assert (source.path, source.source) == (smollm2_dir, "store")
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    shape = (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"])
    assert shape == (30, 576, True)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"


def test_converted_weights_answer_like_the_original(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_second_pull_says_present_and_fetches_nothing(real_home, smollm2_dir, capsys):
    # The autouse hub_env fixture replaced the Hub client and pip with functions that fail the test.
    source = pull.pull_model("smollm2")
    assert (source.path, source.source) == (smollm2_dir, "store")
    assert "smollm2 is already present (store" in capsys.readouterr().err


def test_second_pull_through_the_cli(smollm2_home, tmp_path):
    # HF_HUB_OFFLINE=1 (run_cli's default): any attempt to fetch would fail instead of succeeding.
    proc = run_cli(["pull", "smollm2"], tmp_path, LLMRUN_HOME=smollm2_home)
    assert proc.returncode == 0, proc.stderr
    assert "smollm2 is already present" in proc.stderr
    assert proc.stdout == ""
