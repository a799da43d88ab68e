"""Issue 18: the real SmolLM2 in float32 (538 MB of weights, a 113 MB tied head) runs under
--cpu-mem 150MB with the unbudgeted greedy tokens, its peak RSS within the budget over the runtime's
own baseline: layers staged a matrix at a time, the head in vocabulary chunks, embedding rows read."""

import json
import subprocess
import sys
import threading

import pytest

from tests.cli.helpers import cli_env, run_cli
from tests.test_smollm2_end_to_end import QUESTION
from tests.weights.test_streaming_memory import poll_peak_rss

pytestmark = pytest.mark.slow
MB = 1_000_000
BUDGET = 150 * MB
ARGS = ["run", "smollm2", QUESTION, "-t", "0", "-n", "24", "--json", "--dtype", "float32", "--ctx", "512",
        "--gpu-mem", "0"]


def test_float32_under_150mb_gives_the_unbudgeted_tokens_within_the_budget(smollm2_home, tmp_path):
    resident = run_cli(ARGS, tmp_path, LLMRUN_HOME=smollm2_home)
    assert resident.returncode == 0, resident.stderr
    env = {**cli_env(tmp_path), "LLMRUN_HOME": str(smollm2_home)}
    proc = subprocess.Popen([sys.executable, "-m", "llmrun", *ARGS, "--cpu-mem", f"{BUDGET}B"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    polled = [0]
    poller = threading.Thread(target=poll_peak_rss, args=(proc, polled))
    poller.start()
    stdout, stderr = proc.communicate(timeout=600)
    poller.join()
    assert proc.returncode == 0, stderr
    streamed, memory = json.loads(stdout), json.loads(stdout)["memory"]
    assert memory["layer_tiers"].count("disk") > 20
    assert memory["cpu_plan_bytes"] <= BUDGET
    assert streamed["tokens"] == json.loads(resident.stdout)["tokens"]
    grown = memory["peak_rss_bytes"] - memory["rss_before_weights_bytes"]
    print(f"peak RSS {memory['peak_rss_bytes'] / MB:.0f} MB = baseline {memory['rss_before_weights_bytes'] / MB:.0f}"
          f" + {grown / MB:.0f} MB (budget {BUDGET / MB:.0f} MB); polled peak {polled[0] / MB:.0f} MB")
    assert grown <= BUDGET
    assert polled[0] <= memory["rss_before_weights_bytes"] + BUDGET
