"""The calibration file: measured on first use, read after, refreshed by runs, never a stray file.

Each test has a cache folder of its own (LLMRUN_CACHE), so it starts uncalibrated."""

import json
import subprocess
import sys

import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import cli_env, limited_file_size, run_cli

PLAN = ["plan", "smollm2", "--json", "--cpu-mem", "150MB", "--ctx", "512"]


def machine_entry(cache):
    data = json.loads((cache / "calibration.json").read_text())
    (entry,) = data.values()  # one machine
    return entry


def plan_json(home, cache, tmp_path, *args):
    proc = run_cli([*PLAN, *args], tmp_path, LLMRUN_HOME=home, LLMRUN_CACHE=cache)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_first_plan_measures_and_the_next_reads_the_file(smollm2_home, tmp_path):
    cache = tmp_path / "cache"
    first = plan_json(smollm2_home, cache, tmp_path)
    entry = machine_entry(cache)
    assert {"cpu_read_bytes_s", "page_cache_read_bytes_s"} <= set(entry)
    assert all(item["source"] == "probe" and item["value"] > 0 for item in entry.values())
    bandwidths = first["estimate"]["bandwidths"]  # this plan streams 24 layers from disk
    for role, name in (("compute_read", "cpu_read_bytes_s"), ("page_cache_read", "page_cache_read_bytes_s"),
                       ("disk_read", "disk_read_bytes_s")):
        if name in entry:  # a disk read can be timed cold only where the page cache lets go of the file
            assert bandwidths[role] == {"bytes_per_s": round(entry[name]["value"]), "measured": True,
                                        "source": "probe"}
        else:
            assert bandwidths[role]["source"] == "assumed" and not bandwidths[role]["measured"]
    assert first["estimate"]["layer_step_s"]["source"] == "assumed"  # no run yet
    written = (cache / "calibration.json").stat().st_mtime_ns
    second = plan_json(smollm2_home, cache, tmp_path)
    assert (cache / "calibration.json").stat().st_mtime_ns == written  # read, not measured again
    assert second["estimate"] == first["estimate"]


def test_a_run_refreshes_the_figures_the_next_plan_reads(smollm2_home, tmp_path):
    cache = tmp_path / "cache"
    resident = ["--cpu-mem", "4GB"]  # a resident run always teaches something: its step cost or read rate
    before = plan_json(smollm2_home, cache, tmp_path, *resident)
    ran = run_cli(["run", "smollm2", "Tell me a long story about a dragon and a knight.", "-t", "0", "-n", "32",
                   "--json", "--ctx", "512", *resident], tmp_path, LLMRUN_HOME=smollm2_home, LLMRUN_CACHE=cache)
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["generated_tokens"] >= 16, result  # enough steps to learn from
    read = result["decode_read_bytes_s"] / result["decode_tok_s"]  # bytes a step read, as the plan counts them
    assert read == pytest.approx(before["model"]["weight_bytes"] + 256 * before["kv_cache"]["bytes_per_token"],
                                 rel=1e-2)  # weights (the tied head once) and 256 tokens of KV (rates rounded)
    learnt = {name: item for name, item in machine_entry(cache).items() if item["source"] == "runs"}
    assert learnt, machine_entry(cache)
    after = plan_json(smollm2_home, cache, tmp_path, *resident)
    used = {**after["estimate"]["bandwidths"], "layer_step": after["estimate"]["layer_step_s"]}
    assert any(figure["source"] == "runs" for figure in used.values()), used
    assert after["estimate"]["decode_tok_s"] != before["estimate"]["decode_tok_s"]


def test_a_bench_refreshes_the_figures_from_its_one_sequence_cases(tmp_path):
    tiny = save_checkpoint(tmp_path / "tiny", llama_config(), seed=3)
    cache = tmp_path / "cache"
    proc = run_cli(["bench", tiny, "--quick", "--reps", "1", "--batch", "2", "--dtype", "float32", "--json"],
                   tmp_path, LLMRUN_CACHE=cache)
    assert proc.returncode == 0, proc.stderr
    learnt = {name for name, item in machine_entry(cache).items() if item["source"] == "runs"}
    # resident: the float32 step cost per layer, or the read rate when even that is beaten
    assert learnt & {"cpu_layer_step_s/float32", "cpu_read_bytes_s"}, machine_entry(cache)


def test_no_writable_cache_means_assumed_disk_figures_and_still_a_plan(smollm2_home, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    data = plan_json(smollm2_home, blocker, tmp_path)
    bandwidths = data["estimate"]["bandwidths"]
    assert bandwidths["compute_read"]["source"] == "probe"  # measured in memory, not kept
    assert bandwidths["disk_read"]["source"] == bandwidths["page_cache_read"]["source"] == "assumed"
    table = run_cli(PLAN[:2] + PLAN[3:], tmp_path, LLMRUN_HOME=smollm2_home, LLMRUN_CACHE=blocker, COLUMNS="200")
    assert table.returncode == 0, table.stderr
    assert "disk_read 1.4 GB/s (assumed)" in table.stdout and "layer step 0.35 ms (assumed)" in table.stdout
    assert "compute_read" in table.stdout and "(measured)" in table.stdout


def test_a_damaged_file_is_measured_again(smollm2_home, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "calibration.json").write_text("{not json")
    plan_json(smollm2_home, cache, tmp_path)
    assert machine_entry(cache)["cpu_read_bytes_s"]["source"] == "probe"


def test_disk_full_while_saving_calibration_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "calibration.json").write_text("{}")
    code = ("from llmrun.plan.calibration import record_bandwidth; "
            "record_bandwidth('disk_read_bytes_s', 1e9 + 0.5, 'x' * 100000)")
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(tmp_path, LLMRUN_CACHE=cache),
                          capture_output=True, text=True, timeout=120, preexec_fn=limited_file_size(1000))
    assert done.returncode == 0, done.stderr  # calibration is an optimisation: no error
    assert sorted(p.name for p in cache.iterdir()) == ["calibration.json"]
    assert (cache / "calibration.json").read_text() == "{}"
