"""`llmrun bench` end to end on a tiny checkpoint: the report's fields, ratios and KV waste."""

import json

import pytest
import torch

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import assert_one_line_error, run_cli
from tests.kernel_checks import TINY_MATMULS, c_kernels, gemv_passes, gemv_should_pass, layer_passes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("bench") / "tiny", llama_config(), seed=3)


def test_quick_bench_with_transformers_comparison(tiny, tmp_path):
    proc = run_cli(["bench", tiny, "--quick", "--batch", "4", "--reps", "2", "--dtype", "float32", "--compare", "transformers",
                    "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout, parse_constant=_reject)  # strict JSON: no NaN or Infinity
    assert data["schema"] == "llmrun.bench/1" and data["dtype"] == "float32" and data["repetitions"] == 2
    assert set(data["cases"]) == {"prompt64_b1", "prompt64_b4"}
    single = data["cases"]["prompt64_b1"]
    for figure in ("ttft_s", "prefill_tok_s", "decode_tok_s"):
        stat = single["llmrun"][figure]
        assert stat["min"] <= stat["median"] <= stat["max"] and stat["median"] > 0
    assert single["speedup"]["decode_tok_s"] > 0 and "ttft_s" in single["speedup"]
    assert single["tokens_match"] is True  # greedy fp32 on the same prompt: transformers' tokens
    assert data["kv_cache"]["under_one_block"] and data["kv_cache"]["max_wasted_slots_per_seq"] < 16
    assert data["machine"]["threads"] >= 1 and data["peak_rss_bytes"] > 0
    kernels = data["kernels"]  # C on the CPU (Triton on a GPU), or none without a compiler or triton
    assert kernels["set"] in (("C", None) if data["machine"]["device"] == "cpu" else ("Triton", None))
    if kernels["set"] == "C":  # one sequence's float32 steps ran each layer in one C call where its check passed
        assert kernels["layer"] is layer_passes()
    batched = data["cases"]["prompt64_b4"]["transformers"]  # generate_batch: no time to first token
    assert batched["ttft_s"]["median"] is None and batched["decode_tok_s"]["median"] > 0


def _reject(constant):
    raise AssertionError(f"{constant} in the JSON report")


def test_bench_table_and_bad_arguments(tiny, tmp_path):
    proc = run_cli(["bench", tiny, "--quick", "--reps", "1"], tmp_path, COLUMNS="160")
    assert proc.returncode == 0, proc.stderr
    assert "decode tok/s" in proc.stdout and "KV waste" in proc.stdout and "kernels: " in proc.stdout
    assert_one_line_error(run_cli(["bench", tiny, "--compare", "vllm"], tmp_path), "--compare must be one of")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bench_reports_the_kernels_whose_checks_passed(tiny, tmp_path, dtype):
    """The kernels bench reports are those whose self-checks passed here, asked of the library (not
    read from CPU flags): the bf16 GEMV on those shapes, the float32 layer in one C call; none of them
    where the check failed, the CPU lacks the instructions or no compiler built the kernels
    (tests/test_simulated_cpus.py runs this with each taken away)."""
    proc = run_cli(["bench", tiny, "--quick", "--reps", "1", "--dtype", dtype, "--gpu-mem", "0", "--json"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    kernels = json.loads(proc.stdout)["kernels"]
    native = c_kernels(getattr(torch, dtype))
    if native is None:
        assert kernels["set"] is None
        return
    assert kernels["set"] == "C"
    if dtype == "float32":
        assert kernels["gemv_shapes"] is None and kernels["layer"] is layer_passes()
        return
    assert kernels["layer"] is False and (kernels["gemv_shapes"] is None) is (not native.gemv)
    ran = {tuple(map(int, shape.split("x"))) for shape in kernels["gemv_shapes"] or ()}
    assert ran == {shape for shape in TINY_MATMULS if gemv_passes(*shape)}
    assert ran == set(TINY_MATMULS) or not gemv_should_pass()  # with AMX, every shape of whole blocks

