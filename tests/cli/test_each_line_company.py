"""`llmrun run --each-line` on the real SmolLM2 in bfloat16: a line's reply does not depend on its batch."""

import json

import pytest

from tests.cli.helpers import run_cli

pytestmark = pytest.mark.slow


def each_line(home, tmp_path, batch):
    proc = run_cli(["run", "smollm2", "--each-line", "--batch", batch, "-n", "16", "-t", "0", "--dtype", "bfloat16"],
                   tmp_path, stdin="one\ntwo\n", LLMRUN_HOME=home)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_each_line_batch_2_gives_batch_1s_tokens(smollm2_home, tmp_path):
    batched, alone = each_line(smollm2_home, tmp_path, 2), each_line(smollm2_home, tmp_path, 1)
    assert [r["prompt"] for r in batched] == ["one", "two"]
    assert [r["tokens"] for r in batched] == [r["tokens"] for r in alone]
    assert [r["text"] for r in batched] == [r["text"] for r in alone]
