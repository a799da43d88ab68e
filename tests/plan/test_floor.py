"""The floor: `plan` says the smallest budget that runs the model at the asked context and batch; that
budget plans, a byte less is refused, and the refusal names the same figure."""

import json

import pytest

from llmrun.sizes import format_bytes
from tests.checkpoints import llama_70b_config, save_sparse_checkpoint
from tests.cli.helpers import assert_one_line_error, run_cli

GiB = 1024**3


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory):
    """A Llama-3-70B-shaped bf16 checkpoint: headers only (80 layers of 1.6 GiB, no data)."""
    return save_sparse_checkpoint(tmp_path_factory.mktemp("l70b") / "llama-70b", llama_70b_config(), dtype="BF16",
                                  num_shards=30)


def plan_json(model, tmp_path, *args, **env):
    proc = run_cli(["plan", model, "--json", *args], tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def check_floor(model, tmp_path, flag, fixed, **env):
    """Plan with a comfortable budget; then exactly at the floor it reports, and a byte under it."""
    data = plan_json(model, tmp_path, *fixed, **env)
    floor = data["floor"]["bytes"]
    assert data["floor"]["tier"] == ("gpu" if flag == "--gpu-mem" else "cpu")
    at_floor = plan_json(model, tmp_path, *fixed, flag, f"{floor}B", **env)
    assert at_floor["floor"]["bytes"] == floor  # the floor does not depend on the budget asked for
    under = run_cli(["plan", model, *fixed, flag, f"{floor - 1}B"], tmp_path, **env)
    assert_one_line_error(under, f"needs at least {format_bytes(floor)} of {data['floor']['tier'].upper()} memory")
    table = run_cli(["plan", model, *fixed], tmp_path, COLUMNS="200", **env)
    assert f"Runs from {format_bytes(floor)} of {data['floor']['tier'].upper()} memory" in table.stdout
    return floor


def test_smollm2_floor_in_cpu_memory(smollm2_home, tmp_path):
    floor = check_floor("smollm2", tmp_path, "--cpu-mem", ["--ctx", "512", "--cpu-mem", "4GB"],
                        LLMRUN_HOME=smollm2_home)
    with_batch = plan_json("smollm2", tmp_path, "--ctx", "512", "--batch", "4", LLMRUN_HOME=smollm2_home)
    assert with_batch["floor"]["bytes"] > floor  # more sequences need more KV cache


def test_llama_70b_floor_in_gpu_memory(llama_70b, tmp_path):
    fixed = ["--gpu-mem", "24GB", "--cpu-mem", "200GB", "--ctx", "512"]
    check_floor(llama_70b, tmp_path, "--gpu-mem", fixed)
