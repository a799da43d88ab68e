"""scripts/decode_floor.py on a tiny checkpoint: it runs end to end and reports every figure."""

import json
import subprocess
import sys
from pathlib import Path

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import cli_env

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "decode_floor.py"


def test_decode_floor_reports_the_bounds(tmp_path):
    tiny = save_checkpoint(tmp_path / "tiny", llama_config(), seed=5)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tiny), "--dtype", "float32",
                           "--prompt-tokens", "16", "--new-tokens", "4", "--reps", "1"],
                          capture_output=True, text=True, env=cli_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["dtype"] == "float32" and report["matmul_weight_bytes"] > 0
    for figure in ("stream_gb_s", "bandwidth_bound_tok_s", "matmul_floor_tok_s", "llmrun_decode_tok_s",
                   "transformers_decode_tok_s", "achieved_ratio", "ceiling_ratio", "non_matmul_warm_ms_per_token"):
        # rates rounded for the report: a busy machine may round one to 0.0; the report must have each
        assert isinstance(report[figure], (int, float)) and report[figure] >= 0, figure
