"""Disk streaming under a CPU budget well below the model: peak RSS stays within budget."""

import json
import subprocess
import sys
import threading
import time

import psutil
import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import cli_env

MB = 1_000_000
MARGIN_BYTES = 80 * MB  # allocator slack, Python objects, the tokenizer's lazily built caches


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    """~450 MB of fp32 weights: 12 layers of ~38 MB."""
    config = llama_config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, num_key_value_heads=4)
    return save_checkpoint(tmp_path_factory.mktemp("medium") / "medium", config, seed=5)


def poll_peak_rss(proc: subprocess.Popen, peak: list) -> None:
    handle = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak[0] = max(peak[0], handle.memory_info().rss)
        except psutil.Error:
            return
        time.sleep(0.005)


def test_peak_rss_stays_within_budget_while_streaming(medium, tmp_path):
    budget = 150 * MB
    args = [sys.executable, "-m", "llmrun", "run", str(medium), "Hello there", "--raw", "-t", "0",
            "-n", "12", "--dtype", "float32", "--ctx", "256", "--cpu-mem", f"{budget}B", "--gpu-mem", "0", "--json"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(tmp_path))
    polled = [0]
    poller = threading.Thread(target=poll_peak_rss, args=(proc, polled))
    poller.start()
    stdout, stderr = proc.communicate(timeout=300)
    poller.join()
    assert proc.returncode == 0, stderr
    result = json.loads(stdout)
    memory = result["memory"]
    weights_bytes = sum(f.stat().st_size for f in medium.glob("*.safetensors"))
    assert weights_bytes > 2.5 * budget                    # the model is well above the budget
    assert memory["layer_tiers"].count("disk") >= 8        # most layers stream
    assert memory["cpu_plan_bytes"] <= budget              # the plan (staging included) fits
    grown = memory["peak_rss_bytes"] - memory["rss_before_weights_bytes"]
    print(f"peak RSS grew {grown / MB:.0f} MB over the baseline (budget {budget / MB:.0f} MB); "
          f"psutil polling saw a peak of {polled[0] / MB:.0f} MB")
    assert grown <= budget + MARGIN_BYTES
    assert polled[0] <= memory["rss_before_weights_bytes"] + budget + MARGIN_BYTES
    assert result["generated_tokens"] == 12 or result["finish_reason"] == "eos"


def test_streamed_run_gives_the_resident_tokens(medium, tmp_path):
    from tests.cli.helpers import run_cli

    base = ["run", medium, "Hello there", "--raw", "-t", "0", "-n", "12", "--dtype", "float32", "--ctx", "256",
            "--gpu-mem", "0", "--json"]
    resident = json.loads(run_cli(base, tmp_path).stdout)
    streamed = json.loads(run_cli(base + ["--cpu-mem", "150MB"], tmp_path).stdout)
    assert "disk" not in resident["memory"]["layer_tiers"]
    assert "disk" in streamed["memory"]["layer_tiers"]
    assert streamed["tokens"] == resident["tokens"]
