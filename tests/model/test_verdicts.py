"""Kernel self-check verdicts remembered per machine (kernels/verdicts.py)."""

import json
import subprocess
import sys

import pytest
import torch

from llmrun.kernels.verdicts import VerdictStore, machine_identity
from tests.kernel_checks import gemv_should_pass


def counting(result):
    calls = []

    def check():
        calls.append(1)
        return result
    return check, calls


def test_a_verdict_is_checked_once_then_read_back_even_by_a_new_store(tmp_path):
    check, calls = counting(True)
    assert VerdictStore(tmp_path, "lib-a.so").verdict("gemv_matches", "64x32", 2, check) is True
    assert VerdictStore(tmp_path, "lib-a.so").verdict("gemv_matches", "64x32", 2, check) is True
    assert len(calls) == 1
    failing, failed_calls = counting(False)
    assert VerdictStore(tmp_path, "lib-a.so").verdict("gemv_matches", "96x32", 2, failing) is False
    assert VerdictStore(tmp_path, "lib-a.so").verdict("gemv_matches", "96x32", 2, failing) is False
    assert len(failed_calls) == 1


@pytest.mark.parametrize("change", ["library", "shape", "threads", "check"])
def test_anything_that_changes_the_sums_makes_a_new_key(tmp_path, change):
    check, calls = counting(True)
    VerdictStore(tmp_path, "lib-a.so").verdict("gemv_matches", "64x32", 2, check)
    other = {"library": ("lib-b.so", "gemv_matches", "64x32", 2), "shape": ("lib-a.so", "gemv_matches", "64x64", 2),
             "threads": ("lib-a.so", "gemv_matches", "64x32", 1), "check": ("lib-a.so", "layer", "64x32", 2)}[change]
    VerdictStore(tmp_path, other[0]).verdict(*other[1:], check)
    assert len(calls) == 2


def test_the_key_names_the_cpu_and_the_reference_library():
    identity = machine_identity()
    assert torch.__version__ in identity
    with open("/proc/cpuinfo") as handle:
        flags_line = next((line for line in handle if line.startswith("flags")), "")
    assert flags_line.partition(":")[2].strip() in identity
    assert torch.backends.cpu.get_cpu_capability() in identity  # ATEN_CPU_CAPABILITY's effect


def test_capping_onednn_s_instructions_changes_the_key(monkeypatch):
    code = "from llmrun.kernels.verdicts import machine_identity; print(machine_identity())"
    import os
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    capped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}).stdout
    assert plain != capped


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"x": "yes"}'])
def test_a_damaged_file_means_checking_again(tmp_path, content):
    (tmp_path / "verdicts.json").write_text(content)
    check, calls = counting(True)
    assert VerdictStore(tmp_path, "lib.so").verdict("gemv_matches", "64x32", 2, check) is True
    assert calls == [1]
    assert isinstance(json.loads((tmp_path / "verdicts.json").read_text()), dict)


def test_an_unwritable_folder_still_gives_the_checks_answer(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    check, calls = counting(False)
    store = VerdictStore(blocker / "below", "lib.so")  # a file where the folder should be
    assert store.verdict("gemv_matches", "64x32", 2, check) is False
    assert store.verdict("gemv_matches", "64x32", 2, check) is False  # remembered in the process
    assert calls == [1]


GEMV_PROBE = """
import sys, torch
from tests.kernel_checks import gemv_passes
print(gemv_passes(64, 64))
"""


@pytest.mark.skipif(not gemv_should_pass(), reason="the GEMV's check does not pass on this machine")
def test_a_forced_failure_wins_over_a_remembered_pass(tmp_path):
    env = {"LLMRUN_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    import os
    env = {**os.environ, **env}
    first = subprocess.run([sys.executable, "-c", GEMV_PROBE], env=env, capture_output=True, text=True, check=True)
    assert first.stdout.strip() == "True"
    remembered = list(tmp_path.rglob("verdicts.json"))
    assert remembered and json.loads(remembered[0].read_text())
    forced = subprocess.run([sys.executable, "-c", GEMV_PROBE], env={**env, "LLMRUN_FAIL_CHECKS": "gemv"},
                            capture_output=True, text=True, check=True)
    assert forced.stdout.strip() == "False"
