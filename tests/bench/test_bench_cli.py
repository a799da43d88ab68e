"""`llmrun bench` end to end on a tiny checkpoint: the report's fields, ratios and KV waste."""

import json

import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import assert_one_line_error, run_cli


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
    if kernels["set"] == "C":  # one sequence's float32 steps ran each layer in one C call where it builds
        from llmrun.model.native import load_library

        lib = load_library()
        assert kernels["layer"] is (hasattr(lib, "decode_layer_f32") and bool(lib.layer_supported()))
    batched = data["cases"]["prompt64_b4"]["transformers"]  # generate_batch: no time to first token
    assert batched["ttft_s"]["median"] is None and batched["decode_tok_s"]["median"] > 0


def _reject(constant):
    raise AssertionError(f"{constant} in the JSON report")


def test_bench_table_and_bad_arguments(tiny, tmp_path):
    proc = run_cli(["bench", tiny, "--quick", "--reps", "1"], tmp_path, COLUMNS="160")
    assert proc.returncode == 0, proc.stderr
    assert "decode tok/s" in proc.stdout and "KV waste" in proc.stdout and "kernels: " in proc.stdout
    assert_one_line_error(run_cli(["bench", tiny, "--compare", "llama.cpp"], tmp_path), "--compare must be one of")


def test_bf16_bench_reports_the_gemv(tiny, tmp_path):
    from llmrun.model.native import load_library

    proc = run_cli(["bench", tiny, "--quick", "--reps", "1", "--dtype", "bfloat16", "--gpu-mem", "0", "--json"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    kernels = json.loads(proc.stdout)["kernels"]
    lib = load_library()
    if lib is None:
        assert kernels["set"] is None
        return
    assert kernels["set"] == "C"
    if hasattr(lib, "gemv_bf16_packed") and lib.gemv_supported():
        # one sequence's steps: qkv 128x64, o 64x64, gate/up 256x64, down 64x128, head 320x64
        assert kernels["gemv_shapes"], kernels
