"""`llmrun bench --compare llama.cpp`: llama.cpp on the GGUF the model came from, same prompt tokens and
threads, in the same run; a one-line skip where llama-cpp-python is not installed. The runs that need
the package are skipped without it (CI installs only the [test] extra, not [llamacpp])."""

import json

import pytest

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import assert_one_line_error, run_cli
from tests.hub.gguf_files import write_tiny_gguf

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (extra [llamacpp])")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-gguf")
    checkpoint = save_checkpoint(folder / "tiny", llama_config(), seed=3)
    return write_tiny_gguf(checkpoint, folder / "tiny.gguf")


def test_without_the_package_the_compare_is_skipped_in_one_line(tiny_gguf, tmp_path):
    hidden = tmp_path / "hide" / "llama_cpp"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    proc = run_cli(["bench", tiny_gguf, "--quick", "--reps", "1", "--dtype", "float32", "--compare", "llama.cpp",
                    "--json"], tmp_path, PYTHONPATH=f"{hidden.parent}:{run_cli_root()}")
    assert proc.returncode == 0, proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if "--compare llama.cpp skipped" in line]
    assert skipped == ["llmrun: bench: --compare llama.cpp skipped: the llama-cpp-python package is not installed "
                       "(pip install 'llmrun[llamacpp]' builds it, a few minutes)"]
    data = json.loads(proc.stdout)
    assert data["compare"] == "none" and all(set(case) == {"llmrun"} for case in data["cases"].values())


def run_cli_root() -> str:
    from pathlib import Path

    return str(Path(__file__).resolve().parents[2])


@needs_llama_cpp
def test_llama_cpp_runs_on_the_same_gguf_prompt_and_threads(tiny_gguf, tmp_path):
    proc = run_cli(["bench", tiny_gguf, "--quick", "--reps", "1", "--dtype", "float32", "--compare", "llama.cpp",
                    "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["compare"] == "llama.cpp"
    facts = data["machine"]["llama.cpp"]
    assert facts["package"] == f"llama-cpp-python {llama_cpp.__version__}" and facts["gguf"] == "tiny.gguf"
    assert facts["threads"] == data["machine"]["threads"] and facts["cases"] == ["prompt64_b1"]
    single = data["cases"]["prompt64_b1"]
    assert single["llama.cpp"]["decode_tok_s"]["median"] > 0 and single["speedup"]["decode_tok_s"] > 0
    assert single["tokens_match"] is True  # greedy on the same float32 weights: the same tokens
    batched = [case for name, case in data["cases"].items() if name != "prompt64_b1"]
    assert batched and all(set(case) == {"llmrun"} for case in batched)  # llama.cpp: one sequence at a time


@needs_llama_cpp
def test_a_model_from_no_gguf_is_one_line(tmp_path):
    folder = save_checkpoint(tmp_path / "plain", llama_config(), seed=3)
    proc = run_cli(["bench", folder, "--quick", "--reps", "1", "--compare", "llama.cpp"], tmp_path)
    assert_one_line_error(proc, "--compare llama.cpp runs llama.cpp on the GGUF a model was imported from")
