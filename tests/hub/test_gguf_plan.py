"""`llmrun plan FILE.gguf` reads the GGUF header only: no import, and the same plan the import gives."""

import json

import pytest

from llmrun.errors import InvalidModelError
from llmrun.hub import gguf_header, gguf_import
from llmrun.hub.resolve import resolve_model
from llmrun.plan.inputs import plan_inputs
from llmrun.weights.index import build_index
from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import assert_one_line_error, run_cli
from tests.hub.gguf_files import write_tiny_gguf, write_unknown_architecture_gguf

PLAN_ARGS = ["--json", "--gpu-mem", "0", "--cpu-mem", "1GB", "--ctx", "64", "--dtype", "float32"]
COMPARED = ("model", "dtype", "ctx", "kv_cache", "reservations", "layer_tiers", "head_tier", "embed_tier",
            "streamed_bytes_per_token")


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tied") / "tied-llama"
    return save_checkpoint(folder, llama_config(tie_word_embeddings=True), seed=5)


# long_array 8: the tokenizer's arrays are skipped as in real files, and without llama.vocab_size the
# vocabulary is the number of tokens, as transformers counts it
@pytest.mark.parametrize("long_array, with_vocab_size", [(4096, True), (8, True), (8, False)])
@pytest.mark.parametrize("checkpoint_fixture", ["tiny_checkpoint", "tied_checkpoint"])
def test_header_inputs_equal_the_imported_model(request, tmp_path, monkeypatch, hub_env, checkpoint_fixture,
                                                long_array, with_vocab_size):
    gguf_file = write_tiny_gguf(request.getfixturevalue(checkpoint_fixture), tmp_path / "m.gguf",
                                with_vocab_size=with_vocab_size)
    monkeypatch.setattr(gguf_header, "_LONG_ARRAY", long_array)

    def no_conversion(*args):
        raise AssertionError("plan converted the GGUF")

    with monkeypatch.context() as patched:
        patched.setattr(gguf_import, "_convert", no_conversion)
        planned = plan_inputs(str(gguf_file))
    assert not hub_env["store"].exists() or list(hub_env["store"].iterdir()) == []
    imported = resolve_model(str(gguf_file))
    assert planned.name == imported.name and planned.folder == gguf_file
    assert planned.config == json.loads((imported.path / "config.json").read_text())
    real = build_index(imported.path).tensors
    assert {n: (t.dtype, t.shape) for n, t in planned.index.tensors.items()} == \
        {n: (t.dtype, t.shape) for n, t in real.items()}
    assert planned.index.total_bytes == sum(t.num_bytes for t in real.values())


def test_plan_command_imports_nothing_and_plans_like_the_import(tmp_path, tiny_checkpoint):
    gguf_file = write_tiny_gguf(tiny_checkpoint, tmp_path / "tiny.gguf")
    before = run_cli(["plan", gguf_file, *PLAN_ARGS], tmp_path)
    assert before.returncode == 0, before.stderr
    assert not (tmp_path / "llmrun-home" / "models").exists()
    header_plan = json.loads(before.stdout)
    assert header_plan["model"]["path"] == str(gguf_file)
    assert run_cli(["run", gguf_file, "hi", "-n", "1", "-t", "0", "-q"], tmp_path).returncode == 0
    after = json.loads(run_cli(["plan", gguf_file, *PLAN_ARGS], tmp_path).stdout)
    assert {key: header_plan[key] for key in COMPARED} == {key: after[key] for key in COMPARED}


def test_unsupported_architecture_is_one_line(tmp_path):
    write_unknown_architecture_gguf(tmp_path / "odd.gguf")
    with pytest.raises(InvalidModelError, match=r"^cannot read odd.gguf's header: .*fancyarch"):
        plan_inputs(str(tmp_path / "odd.gguf"))
    assert_one_line_error(run_cli(["plan", tmp_path / "odd.gguf"], tmp_path), "odd.gguf's header")


def test_truncated_header_is_one_line(tmp_path, tiny_checkpoint):
    gguf_file = write_tiny_gguf(tiny_checkpoint, tmp_path / "cut.gguf")
    gguf_file.write_bytes(gguf_file.read_bytes()[:2000])  # inside the tokenizer's metadata
    with pytest.raises(InvalidModelError, match=r"^cannot read cut.gguf's header: the header ends early"):
        plan_inputs(str(gguf_file))
