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


def rows_of(proc):
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_prompt_argument_applies_to_every_line(tiny, tmp_path):
    args = ["run", tiny, "--raw", "-t", "0", "-n", "6", "--dtype", "float32"]
    rows = rows_of(run_cli([*args, "Translate to French:", "--each-line"], tmp_path, stdin="one\ntwo\n"))
    assert [r["prompt"] for r in rows] == ["one", "two"]
    for row, line in zip(rows, ("one", "two")):  # as `run` joins stdin and the argument
        alone = json.loads(run_cli([*args, "Translate to French:", "--json"], tmp_path, stdin=line + "\n").stdout)
        assert (row["tokens"], row["prompt_tokens"]) == (alone["tokens"], alone["prompt_tokens"])
    without = rows_of(run_cli([*args, "--each-line"], tmp_path, stdin="one\ntwo\n"))
    assert all(w["prompt_tokens"] < r["prompt_tokens"] for w, r in zip(without, rows))


def test_index_is_the_input_line_number_and_blank_lines_keep_theirs(tiny, tmp_path):
    proc = run_cli(["run", tiny, "--each-line", "--raw", "-t", "0", "-n", "2"], tmp_path,
                   stdin="first\n\n   \nsecond\r\n\nthird")
    assert proc.returncode == 0, proc.stderr
    assert [(r["index"], r["prompt"]) for r in rows_of(proc)] == [(0, "first"), (3, "second"), (5, "third")]


def test_a_line_too_long_gets_an_error_row_and_the_rest_goes_on(tiny, tmp_path):
    lines = ["Hello", "word " * 40, "Paris", "a b c", "word " * 50, "def main():"]
    args = ["run", tiny, "--raw", "-t", "0", "-n", "4", "--dtype", "float32", "--ctx", "32"]
    proc = run_cli([*args, "--each-line", "--batch", "2"], tmp_path, stdin="\n".join(lines) + "\n")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == ["llmrun: error: 2 of 6 prompt lines failed (see their \"error\" rows): "
                                        "index 1, 4"]
    rows = rows_of(proc)
    assert [r["index"] for r in rows] == list(range(6))
    for index in (1, 4):
        assert set(rows[index]) == {"index", "prompt", "error"}
        assert "but the context window is 32 tokens" in rows[index]["error"]
    for index in (0, 2, 3, 5):
        alone = json.loads(run_cli([*args, lines[index], "--json"], tmp_path).stdout)
        assert rows[index]["tokens"] == alone["tokens"]


def test_batch_reserves_memory_for_at_most_the_lines_read(tiny, tmp_path):
    # 8 MB holds the KV cache of 2 sequences of this model, not of 512 (`llmrun plan` says 254 MB)
    args = ["run", tiny, "--raw", "-t", "0", "-n", "2", "--cpu-mem", "8MB", "--each-line"]
    proc = run_cli([*args, "--batch", "512"], tmp_path, stdin="one\ntwo\n")
    assert proc.returncode == 0, proc.stderr
    assert [r["tokens"] for r in rows_of(proc)] == [r["tokens"] for r in rows_of(
        run_cli([*args, "--batch", "2"], tmp_path, stdin="one\ntwo\n"))]
    assert_one_line_error(run_cli([*args, "--batch", "512"], tmp_path, stdin="x\n" * 600),
                          "x 512 sequence(s) needs at least")
