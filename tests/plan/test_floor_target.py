"""Issue 18's floor target: a Llama-3-70B-shaped bf16 checkpoint plans in 4 GB of GPU memory and runs
from at most 3 GiB (staging per matrix, the head in chunks: the streaming work's rule)."""

import re

from tests.cli.helpers import run_cli
from tests.plan.test_floor import GiB, llama_70b, plan_json  # noqa: F401 (the fixture)


def test_llama_70b_runs_from_3_gib_and_plans_in_4gb(llama_70b, tmp_path):
    data = plan_json(llama_70b, tmp_path, "--gpu-mem", "4GB", "--cpu-mem", "200GB", "--ctx", "512")
    assert data["floor"] == {"tier": "gpu", "bytes": data["floor"]["bytes"]} and data["floor"]["bytes"] <= 3 * GiB
    proc = run_cli(["plan", llama_70b, "--gpu-mem", "4GB", "--cpu-mem", "200GB", "--ctx", "512"], tmp_path,
                   COLUMNS="200")
    assert re.search(r"Runs from [0-9.]+ GiB of GPU memory", proc.stdout), proc.stdout
