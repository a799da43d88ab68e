"""`llmrun run`'s input: --raw sends the text exactly as given; --batch reserves for the prompts there are."""

import json

import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("input") / "tiny", llama_config(), seed=3)


def hf_token_count(folder, text):
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder)(text)["input_ids"])


def prompt_tokens(smollm2_home, tmp_path, args, stdin=""):
    proc = run_cli(["run", "smollm2", "--raw", "-n", "1", "--ctx", "64", "--json", *args], tmp_path, stdin=stdin,
                   LLMRUN_HOME=smollm2_home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["prompt_tokens"]


@pytest.mark.parametrize("where,text", [("argument", "\n\nHello\n\n"), ("stdin", "\n Hello \n")])
def test_raw_prompt_is_tokenized_exactly(smollm2_home, smollm2_dir, tmp_path, where, text):
    args, stdin = ([text], "") if where == "argument" else ([], text)
    assert prompt_tokens(smollm2_home, tmp_path, args, stdin) == hf_token_count(smollm2_dir, text)


def test_raw_each_line_keeps_spaces_and_drops_only_the_line_end(smollm2_home, smollm2_dir, tmp_path):
    proc = run_cli(["run", "smollm2", "--raw", "-n", "1", "--ctx", "64", "--each-line"], tmp_path,
                   stdin="  Hello  \n\tworld \r\n", LLMRUN_HOME=smollm2_home)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["  Hello  ", "\tworld "]
    assert [r["prompt_tokens"] for r in rows] == [hf_token_count(smollm2_dir, t) for t in ("  Hello  ", "\tworld ")]


def test_a_single_prompt_reserves_for_one_sequence_whatever_batch_says(tiny, tmp_path):
    def plan_bytes(*extra):
        proc = run_cli(["run", tiny, "Hello", "--raw", "-n", "1", "--json", *extra], tmp_path)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["memory"]["cpu_plan_bytes"]

    assert plan_bytes("--batch", "64") == plan_bytes()
