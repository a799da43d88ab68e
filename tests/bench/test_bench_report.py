"""`llmrun bench` as people meet it: the accelerate comparison, a context too short, --quick with
--new-tokens, progress on a terminal, quiet pipes, and the text table."""

import json

import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("bench-report") / "tiny", llama_config(), seed=3)


def test_accelerate_compare_runs_resident_when_nothing_streams(tiny, tmp_path):
    proc = run_cli(["bench", tiny, "--quick", "--reps", "1", "--dtype", "float32", "--compare", "accelerate",
                    "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["placement"]["streamed_bytes_per_token"] == 0 and data["placement"]["disk_reads"] is None
    single = data["cases"]["prompt64_b1"]
    assert single["accelerate"]["decode_tok_s"]["median"] > 0 and single["tokens_match"] is True
    assert proc.stderr == ""  # a pipe: no progress, and transformers' bars and warnings kept quiet


def test_context_too_short_for_the_workload_is_one_line(tiny, tmp_path):
    proc = run_cli(["bench", tiny, "--quick", "--ctx", "32"], tmp_path)
    assert_one_line_error(proc, "--ctx 32 is too short for the benchmark: its smallest case needs 80 tokens")


@pytest.mark.parametrize("args,new_tokens", [([], 16), (["--new-tokens", "5"], 5)])
def test_quick_takes_new_tokens_when_given(tiny, tmp_path, args, new_tokens):
    proc = run_cli(["bench", tiny, "--quick", "--reps", "1", "--batch", "2", "--json", *args], tmp_path)
    assert proc.returncode == 0, proc.stderr
    cases = json.loads(proc.stdout)["cases"]
    assert {entry["llmrun"]["new_tokens"] for entry in cases.values()} == {new_tokens}


def test_progress_on_a_terminal_and_the_whole_table_in_a_pipe(tiny, tmp_path):
    """stderr a terminal (progress shows the case running), stdout a pipe (nothing cut at 80 columns)."""
    import os
    import pty
    import subprocess
    import sys
    import threading

    from tests.cli.helpers import cli_env

    primary, secondary = pty.openpty()
    env = {k: v for k, v in cli_env(tmp_path).items() if k != "COLUMNS"}
    child = subprocess.Popen([sys.executable, "-m", "llmrun", "bench", tiny, "--quick", "--reps", "2"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=secondary, env=env)
    os.close(secondary)
    seen = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    stdout, _ = child.communicate(timeout=300)
    reader.join(timeout=10)
    os.close(primary)
    assert child.returncode == 0, seen.decode(errors="replace")
    assert b"bench: llmrun prompt64_b" in seen, seen.decode(errors="replace")
    text = stdout.decode()
    assert "…" not in text and "{'" not in text, text
    header = text.splitlines()[0]
    assert "layers on CPU" in header and header.endswith("median (min-max) of 2"), header


def test_bench_table_shows_every_spread_and_readable_placement(capsys):
    from llmrun.display import render_bench

    def stat(median, low, high):
        return {"median": median, "min": low, "max": high}

    ours = {"ttft_s": stat(0.25, 0.2, 0.3), "prefill_tok_s": stat(512, 480, 540), "decode_tok_s": stat(50, 48, 52)}
    ref = {"ttft_s": stat(0.5, 0.4, 0.6), "prefill_tok_s": stat(256, 250, 260), "decode_tok_s": stat(25, 24, 26)}
    data = {"model": "m", "dtype": "bfloat16", "machine": {"cpu": "x86_64", "threads": 2},
            "placement": {"compute": "gpu", "layer_tiers": {"gpu": 20, "cpu": 10, "disk": 0},
                          "streamed_bytes_per_token": 110 * 2**20, "ctx": 4096, "batch": 8},
            "repetitions": 3, "compare": "transformers", "kernels": {"set": None},
            "kv_cache": {"block_size": 16, "max_wasted_slots_per_seq": 3}, "peak_rss_bytes": 2**30,
            "peak_gpu_bytes": 0,
            "cases": {"prompt128_b1": {"llmrun": ours, "transformers": ref,
                                       "speedup": {"decode_tok_s": 2.0, "ttft_s": 2.0}, "tokens_match": True}}}
    render_bench(data)
    out = capsys.readouterr().out
    for spread in ("0.250 (0.200-0.300)", "512 (480-540)", "50.0 (48.0-52.0)", "25.0 (24.0-26.0)"):
        assert spread in out, out
    assert "layers 20 on GPU, 10 on CPU, 110.0 MiB streamed per token" in out, out
    assert "{'" not in out and "…" not in out


@pytest.mark.parametrize("no_map,reads", [("0", "in place (mapped)"), ("1", "copied (reader thread)")])
def test_the_report_says_how_layers_streamed_from_disk_were_read(tiny, tmp_path, no_map, reads):
    """On a CPU, layers streamed from disk are read in place from the offload cache's mapping, or
    copied by the reader thread with LLMRUN_NO_MAP=1; the report says which (None: nothing streams)."""
    from llmrun.plan.tiers import Tier
    from tests.placements import streaming_budget

    budget = streaming_budget(tiny, Tier.DISK, dtype="bfloat16", quant="int4", ctx=256, batch=2)
    proc = run_cli(["bench", tiny, "--quick", "--reps", "1", "--batch", "2", "--ctx", "256", "--dtype", "bfloat16",
                    "--quant", "int4", "--gpu-mem", "0", "--cpu-mem", f"{budget}B", "--json"], tmp_path,
                   LLMRUN_NO_MAP=no_map)
    assert proc.returncode == 0, proc.stderr
    placement = json.loads(proc.stdout)["placement"]
    assert placement["layer_tiers"]["disk"] > 0 and placement["disk_reads"] == reads
