"""`llmrun plan` on header-only checkpoints: Phi-3-mini-shaped fp16 and a sharded 70B."""

import json
import re
import time

import pytest

from tests.checkpoints import llama_70b_config, phi3_mini_config, save_sparse_checkpoint
from tests.cli.helpers import assert_one_line_error, assert_usage_error, run_cli

GB = 1_000_000_000


@pytest.fixture(scope="module")
def phi3(tmp_path_factory):
    return save_sparse_checkpoint(tmp_path_factory.mktemp("phi3") / "phi3-mini", phi3_mini_config())


def plan_json(folder, home, *args):
    proc = run_cli(["plan", folder, "--json", *args], home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_phi3_mini_with_6gb_gpu_splits_gpu_and_cpu(phi3, tmp_path):
    data = plan_json(phi3, tmp_path, "--gpu-mem", "6GB", "--ctx", "4096")
    assert data["model"]["weight_bytes"] > 7 * GB and data["dtype"] == "float16"
    tiers = data["layer_tiers"]
    assert tiers.count("gpu") > 0 and tiers.count("cpu") > 0 and "disk" not in tiers
    assert tiers == sorted(tiers, key=["gpu", "cpu", "disk"].index)
    gpu = data["tiers"]["gpu"]
    assert gpu["total_bytes"] <= 6 * GB
    reserved = {r["name"]: r for r in data["reservations"]}
    assert {"runtime", "kv_cache", "workspace", "staging"} <= set(reserved)
    assert all(r["tier"] == "gpu" for r in reserved.values())
    assert gpu["total_bytes"] == gpu["weight_bytes"] + sum(r["bytes"] for r in reserved.values())
    assert data["kv_cache"]["tokens"] == 4096 and data["kv_cache"]["tier"] == "gpu"
    layer_bytes = data["tiers"]["cpu"]["weight_bytes"] - 98_500_000 * 2  # less the embeddings
    assert data["streamed_bytes_per_token"]["cpu"] == pytest.approx(layer_bytes, rel=0.01)
    assert data["estimate"]["decode_tok_s"]["low"] > 0
    bandwidths = data["estimate"]["bandwidths"]
    assert set(bandwidths) == {"host_to_gpu", "compute_read"}  # nothing is read from disk in this plan
    assert all(isinstance(v["measured"], bool) and v["source"] in ("probe", "runs", "assumed")
               for v in bandwidths.values())


def test_gpu_mem_zero_puts_nothing_on_the_gpu(phi3, tmp_path):
    data = plan_json(phi3, tmp_path, "--gpu-mem", "0", "--cpu-mem", "4GB", "--ctx", "1024")
    assert "gpu" not in data["layer_tiers"] and data["compute"] == "cpu"
    assert data["tiers"]["gpu"]["total_bytes"] == 0
    assert data["tiers"]["cpu"]["total_bytes"] <= 4 * GB
    assert data["layer_tiers"].count("disk") > 0
    assert any("stream from disk" in w for w in data["warnings"])


def test_more_ctx_and_batch_reserve_more_kv(phi3, tmp_path):
    small = plan_json(phi3, tmp_path, "--gpu-mem", "0", "--ctx", "1024")
    large = plan_json(phi3, tmp_path, "--gpu-mem", "0", "--ctx", "2048", "--batch", "2")
    assert large["kv_cache"]["bytes"] == 4 * small["kv_cache"]["bytes"]


def test_table_output_shows_tiers_reservations_and_estimate(phi3, tmp_path):
    proc = run_cli(["plan", phi3, "--gpu-mem", "6GB", "--ctx", "4096"], tmp_path, COLUMNS="160")
    assert proc.returncode == 0, proc.stderr
    for fragment in ("GPU", "CPU", "kv_cache", "staging", "runtime", "Streamed per token", "Estimate", "assumed"):
        assert fragment in proc.stdout


def test_70b_sharded_checkpoint_plans_from_headers(tmp_path):
    folder = save_sparse_checkpoint(tmp_path / "llama-70b", llama_70b_config(), num_shards=30)
    started = time.perf_counter()
    data = plan_json(folder, tmp_path, "--gpu-mem", "24GB", "--cpu-mem", "64GB", "--ctx", "8192")
    print(f"planned 70B in {time.perf_counter() - started:.2f} s (process start included)")
    assert data["model"]["parameters"] > 69e9
    assert set(data["layer_tiers"]) == {"gpu", "cpu", "disk"}
    assert data["tiers"]["cpu"]["total_bytes"] <= 64 * GB


@pytest.mark.parametrize("args,fragment", [
    (["--ctx", "100000"], "beyond the model's maximum context of 4096"),
    (["--gpu-mem", "1GB", "--ctx", "4096"], "fits"),
])
def test_bad_plan_inputs_are_one_line_errors(phi3, tmp_path, args, fragment):
    assert_one_line_error(run_cli(["plan", phi3, *args], tmp_path), fragment)


@pytest.mark.parametrize("args,fragment", [
    (["--gpu-mem", "banana"], "invalid size 'banana'"),
    (["--cpu-mem", "-4GB"], "invalid size '-4GB'"),
    (["--dtype", "float8"], "unknown dtype 'float8'"),
    (["--batch", "0"], "'--batch': must be an integer >= 1"),
])
def test_bad_plan_options_are_usage_errors(phi3, tmp_path, args, fragment):
    assert_usage_error(run_cli(["plan", phi3, *args], tmp_path), fragment)


def test_gpu_estimate_prints_one_plain_figure_when_nothing_streams(phi3, tmp_path):
    proc = run_cli(["plan", phi3, "--gpu-mem", "80GB", "--ctx", "1024"], tmp_path, COLUMNS="200")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("Estimate:"))
    assert re.match(r"Estimate: decode \d+ tok/s per sequence", line), line  # not "390-390", not "6.32e+03"


@pytest.mark.parametrize("low,high,text", [
    (6320.4, 6320.4, "6320"), (6320.4, 6400, "6320-6400"), (11.24, 12.0, "11.2-12"), (63.21, 63.24, "63.2"),
    (0.0042, 0.0049, "0.004-0.005"),
])
def test_speed_figures_for_people(low, high, text):
    from llmrun.plan.estimate import format_tok_s

    assert format_tok_s(low, high) == text


def test_plan_table_in_a_pipe_is_not_cut_at_80_columns(phi3, tmp_path):
    env = {"COLUMNS": ""}  # no width from the environment: a pipe's own
    proc = run_cli(["plan", phi3, "--gpu-mem", "6GB", "--ctx", "4096"], tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    estimate = next(line for line in proc.stdout.splitlines() if line.startswith("Estimate:"))
    assert "compute_read" in estimate and "host_to_gpu" in estimate and len(estimate) > 80, proc.stdout
    assert "…" not in proc.stdout
