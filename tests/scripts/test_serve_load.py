"""scripts/serve_load.py on a tiny checkpoint: it runs end to end and reports every figure."""

import json
import subprocess
import sys
from pathlib import Path

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import cli_env

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "serve_load.py"


def test_serve_load_reports_every_figure(tmp_path):
    tiny = save_checkpoint(tmp_path / "tiny", llama_config(max_position_embeddings=1024), seed=5)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny), "--clients", "2", "--new-tokens", "4",
                           "--reps", "1", "--system-tokens", "60"],
                          capture_output=True, text=True, env=cli_env(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for figure in ("decode_tok_s", "ttft_s", "total_tok_s"):
        assert report["bench"][figure] > 0, figure
    for figure in ("total_tok_s", "ttft_p50_s", "ttft_p95_s"):
        assert report["serve"][figure] > 0, figure
    assert len(report["shared_system_prompt"]) == 3
    for shared in report["shared_system_prompt"]:
        assert shared["prompt_tokens"] > 16 and shared["second_cached"] >= 16  # the system prompt's blocks
    assert report["exit_status_after_sigterm"] == 0
    assert report["serve_over_bench_total"] > 0 and report["idle_cpu_s_per_5s"] >= 0
