"""The CPU-dependent tests on simulated machines: AMX, AVX-512, the kernels' checks or the C compiler
taken away in a subprocess, so CI on one kind of x86-64 machine covers the others.

Each case first shows that what it takes away is really gone (oneDNN's kernel, the GEMV's, the
layer's and the int8-activation kernel's checks, the library), then runs a small set of tests there:
the C kernels against ATen, the quantized matmuls against their reference, a
request's bits alone and batched (oneDNN's kernel per row count differs), the bench report of which
kernels ran, and the real SmolLM2's greedy tokens against transformers. Those
tests follow what the checks decided (tests/kernel_checks.py), so they pass on every machine.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmrun.kernels.native import load_library
from llmrun.paths import cache_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# What each case sets before torch loads. The C library is built alike for every CPU (its code picks
# instructions as it runs), so the cases share the normal cache of builds; without a compiler, a run
# on a copy of that cache neither uses a cached build nor adds one.
CASES = {
    "no_amx": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},  # an AMD EPYC: AVX-512 BF16, no AMX
    # the GEMV's, the float32 layer's, the quantized decode kernel's, the AMX and VNNI prompt GEMMs'
    "checks_fail": {"LLMRUN_FAIL_CHECKS": "gemv,layer,quant,amx,vnni_gemm"},
    "no_avx512": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "no_compiler": {"CC": "{tmp}/no-such-cc", "LLMRUN_CACHE": "{tmp}/cache"},
}
TESTS = [
    "tests/model/test_native.py::test_engine_with_kernels_gives_the_aten_paths_logits_and_tokens",
    "tests/model/test_native.py::test_a_bf16_engine_runs_its_matmuls_in_the_gemv",
    "tests/model/test_native_layer.py::test_the_layer_is_used_where_its_check_should_pass",
    "tests/model/test_quant_kernels.py",
    "tests/model/test_quant_amx.py",
    "tests/model/test_quant_vnni_gemm.py",
    "tests/engine/test_batch_invariance.py::test_tiny_alone_equals_batched_over_many_rows_and_chunks[bfloat16]",
    "tests/bench/test_bench_cli.py::test_bench_reports_the_kernels_whose_checks_passed[bfloat16]",
    "tests/test_smollm2_end_to_end.py::test_greedy_tokens_equal_transformers[None]",
]
# One process a case: what the checks decide there (a JSON line), then the tests.
CHILD = """
import json, sys, pytest, torch
from llmrun.kernels.native import load_library
from llmrun.kernels.quant_cpu import CpuQuantMatmul
from tests.kernel_checks import (TINY_MATMULS, amx_gemm_passes, gemv_passes, layer_passes, onednn_bf16_kernel,
                                 quant_kernel_passes, vnni_gemm_passes)
print(json.dumps({"onednn": onednn_bf16_kernel(), "aten": torch.backends.cpu.get_cpu_capability(),
                  "library": load_library() is not None, "layer": layer_passes(), "quant": quant_kernel_passes(),
                  "amx": amx_gemm_passes(), "amx_int": CpuQuantMatmul().amx_int, "vnni_gemm": vnni_gemm_passes(),
                  "gemv": any(gemv_passes(*shape) for shape in TINY_MATMULS)}), flush=True)
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


def assert_taken_away(case: str, found: dict) -> None:
    """What the case takes away is gone (on any machine: a case only takes away)."""
    assert not found["gemv"] and (found["layer"] is False or case == "no_amx"), found
    assert not found["quant"] or case == "no_amx", found  # VNNI needs no AMX: only that case keeps it
    assert not found["vnni_gemm"] or case == "no_amx", found  # (the VNNI prompt GEMM alike)
    assert not found["amx"] and not found["amx_int"], found  # the AMX GEMM and AMX decode tiles: gone in every case
    if case == "no_amx":
        assert "amx" not in found["onednn"], found
    if case == "no_avx512":
        assert found["aten"] == "AVX2" and found["onednn"] == "", found  # nothing packs bf16 weights
    if case == "no_compiler":
        assert not found["library"], found


@pytest.mark.parametrize("case", CASES)
def test_cpu_dependent_tests_pass_on_a_simulated_cpu(case, tmp_path, smollm2_home):
    load_library()  # the normal build, in the normal cache (where there is a compiler)
    normal, copy = cache_dir() / "native", tmp_path / "cache" / "native"
    copy.mkdir(parents=True)
    for build in normal.glob("*.so") if normal.is_dir() else ():
        shutil.copy(build, copy)
    builds = sorted(path.name for path in copy.iterdir())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update({name: value.format(tmp=tmp_path) for name, value in CASES[case].items()})
    proc = subprocess.run([sys.executable, "-c", CHILD, *TESTS], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    lines = proc.stdout.splitlines()
    assert lines and lines[0].startswith("{"), proc.stdout[-2000:] + proc.stderr[-2000:]
    assert_taken_away(case, json.loads(lines[0]))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in lines[-1], proc.stdout[-2000:]  # (some skip where no compiler built the kernels)
    if case == "no_compiler":  # the cached builds went unused (the probe) and none was added
        assert sorted(path.name for path in copy.iterdir()) == builds
