"""`llmrun run --each-line`: every stdin line a prompt, decoded in batches, JSON Lines in order."""

import json

import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import assert_one_line_error, run_cli

LINES = ["The capital of France", "Hello", "how are you today? I am fine", "a b c d e f g",
         "Numbers: 1 2 3", "def main():", "Large language models run locally", "Paris"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("each") / "tiny", llama_config(), seed=21)


def each_line(folder, home, *extra):
    proc = run_cli(["run", folder, "--each-line", "--raw", "-t", "0", "-n", "10", "--dtype", "float32", *extra],
                   home, stdin="\n".join(LINES) + "\n")
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_each_line_in_batches_matches_each_prompt_alone(tiny, tmp_path):
    batched = each_line(tiny, tmp_path, "--batch", "3")
    assert [r["index"] for r in batched] == list(range(8))
    assert [r["prompt"] for r in batched] == LINES
    assert all(set(r) >= {"index", "prompt", "text", "finish_reason", "tokens"} for r in batched)
    alone = each_line(tiny, tmp_path, "--batch", "1")
    assert [r["tokens"] for r in batched] == [r["tokens"] for r in alone]
    for index in (0, 5):
        single = run_cli(["run", tiny, LINES[index], "--raw", "-t", "0", "-n", "10", "--dtype", "float32",
                          "--json"], tmp_path)
        assert json.loads(single.stdout)["tokens"] == batched[index]["tokens"]


def test_each_line_needs_piped_lines(tiny, tmp_path):
    assert_one_line_error(run_cli(["run", tiny, "--each-line"], tmp_path, stdin="\n\n"), "no non-empty lines")
