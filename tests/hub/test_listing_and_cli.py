"""`llmrun models`, `pull` and `import` through the CLI: output streams, fields, one-line errors, exit 1."""

import json
import sys

import pytest

from llmrun.cli import main
from llmrun.hub.listing import describe_model, list_local_models
from tests.cli.helpers import assert_one_line_error, run_cli

SMOL_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Call the console-script entry point in-process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["llmrun", *args])
    code = 0
    try:
        main()
    except SystemExit as done:
        code = done.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def expected_parameters(folder) -> int:
    from safetensors.torch import load_file

    return sum(tensor.numel() for tensor in load_file(str(folder / "model.safetensors")).values())


def test_describe_reads_headers_only(tiny_checkpoint):
    model = describe_model("tiny", tiny_checkpoint, "store")
    assert model.num_parameters == expected_parameters(tiny_checkpoint)
    assert (model.architecture, model.dtype) == ("LlamaForCausalLM", "float32")
    assert model.size_bytes == (tiny_checkpoint / "model.safetensors").stat().st_size


def test_dtype_is_the_most_common_and_shards_sum(model_folder):
    import torch
    from safetensors.torch import save_file

    (model_folder / "model.safetensors").unlink()
    save_file({"big": torch.zeros(10, 10, dtype=torch.bfloat16)}, str(model_folder / "a.safetensors"))
    save_file({"small": torch.zeros(7, dtype=torch.float32), "other": torch.zeros(2, 3, dtype=torch.float16)},
              str(model_folder / "b.safetensors"))
    model = describe_model("mixed", model_folder, "store")
    assert (model.num_parameters, model.dtype) == (113, "bfloat16")
    assert model.size_bytes == sum(p.stat().st_size for p in model_folder.glob("*.safetensors"))


def test_corrupt_header_gives_unknown_parameters(model_folder):
    (model_folder / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}")
    model = describe_model("bad", model_folder, "store")
    assert (model.num_parameters, model.dtype) == (None, None)


def test_list_covers_store_and_cache_and_skips_incomplete(store_entry, cached_repo):
    store_entry("mine")
    store_entry(".tmp-mine-deadbeef")
    cached_repo(SMOL_REPO)
    cached_repo("org/partial", skip=("config.json",))
    assert [(m.name, m.source) for m in list_local_models()] == [("mine", "store"), (SMOL_REPO, "hf-cache")]


def test_models_json(monkeypatch, capsys, store_entry, cached_repo, tiny_checkpoint):
    folder = store_entry("mine")
    snapshot = cached_repo(SMOL_REPO)
    code, out, err = run_main(monkeypatch, capsys, "models", "--json")
    assert (code, err) == (0, "")
    rows = json.loads(out)
    assert [(r["name"], r["source"], r["path"]) for r in rows] == [
        ("mine", "store", str(folder)), (SMOL_REPO, "hf-cache", str(snapshot))]
    for row in rows:
        assert row["architecture"] == "LlamaForCausalLM"
        assert row["parameters"] == expected_parameters(tiny_checkpoint)
        assert row["dtype"] == "float32"
        assert row["size_bytes"] == (tiny_checkpoint / "model.safetensors").stat().st_size


def test_models_table(monkeypatch, capsys, store_entry, cached_repo):
    store_entry("mine")
    cached_repo(SMOL_REPO)
    code, out, err = run_main(monkeypatch, capsys, "models")
    assert (code, err) == (0, "")
    assert "mine" in out and SMOL_REPO in out and "hf-cache" in out and "LlamaForCausalLM" in out


def test_models_empty_hints_on_stderr(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "models")
    assert (code, out) == (0, "")
    assert "llmrun pull smollm2" in err


@pytest.mark.parametrize("args, message", [
    (["pull", "phi3-mini"], "llmrun: error: unknown model 'phi3-mini'; did you mean: phi-3-mini"),
    (["pull", "a/b/c"], "llmrun: error: unknown model 'a/b/c'"),
])
def test_pull_errors_in_process(monkeypatch, capsys, args, message):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert (code, out) == (1, "")
    assert err.splitlines() == [err.strip()] and err.startswith(message)


def test_pull_offline_subprocess(tmp_path):
    proc = run_cli(["pull", "phi-3-mini"], tmp_path, HF_HUB_OFFLINE="1")
    assert_one_line_error(proc, "cannot pull phi-3-mini: HF_HUB_OFFLINE is set")


def test_pull_unreachable_without_alternative_subprocess(tmp_path):
    # A loopback port nobody listens on: the connection is refused at once, nothing leaves the machine.
    proc = run_cli(["pull", "phi-3-mini"], tmp_path, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9")
    assert_one_line_error(proc, "cannot reach the Hugging Face Hub to pull phi-3-mini")


def test_import_not_a_gguf_subprocess(tmp_path):
    (tmp_path / "x.gguf").write_text("hello")
    proc = run_cli(["import", tmp_path / "x.gguf"], tmp_path)
    assert_one_line_error(proc, "x.gguf is not a GGUF file")


def test_import_bad_name_subprocess(tmp_path):
    proc = run_cli(["import", tmp_path / "x.gguf", "--name", "../escape"], tmp_path)
    assert_one_line_error(proc, "no such file")
    (tmp_path / "y.gguf").write_bytes(b"GGUF")
    proc = run_cli(["import", tmp_path / "y.gguf", "--name", "../escape"], tmp_path)
    assert_one_line_error(proc, "invalid model name '../escape'")


def test_import_then_models_subprocess(tmp_path, tiny_checkpoint):
    from tests.hub.gguf_files import write_tiny_gguf

    gguf_file = write_tiny_gguf(tiny_checkpoint, tmp_path / "tiny.gguf")
    proc = run_cli(["import", gguf_file, "--name", "my-tiny"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "my-tiny: ready at" in proc.stderr and "it/s" not in proc.stderr
    listed = run_cli(["models", "--json"], tmp_path)
    assert [row["name"] for row in json.loads(listed.stdout)] == ["my-tiny"]
