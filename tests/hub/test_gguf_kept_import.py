"""`llmrun import` keeping a GGUF's quantization: the kept weights hold exactly the values the
dequantizing import (transformers) writes, the entry stays near the GGUF's size, and what cannot be
kept is dequantized and named."""

import json
import struct

import pytest
import torch

from llmrun.errors import InvalidModelError
from llmrun.hub import gguf_import, store
from llmrun.quant.format import dequantize
from llmrun.quant.stored import METADATA_KEY, load_quantized
from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import assert_one_line_error, run_cli
from tests.hub.gguf_files import write_tiny_gguf

LEGACY = {"attn_q": "Q4_0", "attn_k": "Q5_0", "attn_v": "Q5_1", "attn_output": "Q8_0", "ffn_gate": "Q4_1",
          "ffn_up": "Q4_1", "ffn_down": "Q8_0", "token_embd": "F16", "output": "Q8_0"}
K_MIXED = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q5_K",
           "ffn_up": "Q3_K", "ffn_down": "Q2_K", "token_embd": "Q4_K", "output": "Q6_K"}
Q4_1 = {"token_embd": "Q8_0", **{k: "Q4_1" for k in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                       "ffn_gate", "ffn_up", "ffn_down", "output")}}
Q4_K = {k: "Q4_K" for k in K_MIXED}


def typed(table: dict):
    """tensor_type for write_tiny_gguf: by the GGUF name's module (norms stay F32)."""
    def tensor_type(gguf_name: str) -> str:
        module = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
        return table.get(module, "F32")
    return tensor_type


@pytest.fixture(scope="module")
def wide_checkpoint(tmp_path_factory):
    """A tiny Llama whose rows are multiples of 256 (a K-quant block), with grouped KV heads."""
    config = llama_config(hidden_size=256, intermediate_size=512)
    return save_checkpoint(tmp_path_factory.mktemp("wide") / "wide-llama", config, seed=7)


def stored_tensors(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, handle.metadata()


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@pytest.mark.parametrize("table,checkpoint_fixture", [
    (Q4_1, "tiny_checkpoint"), (LEGACY, "tiny_checkpoint"), (K_MIXED, "wide_checkpoint"),
], ids=["q4_1", "legacy", "k_mixed"])
def test_kept_weights_equal_the_dequantized_import(request, tmp_path, table, checkpoint_fixture):
    checkpoint = request.getfixturevalue(checkpoint_fixture)
    gguf_file = write_tiny_gguf(checkpoint, tmp_path / "m.gguf", tensor_type=typed(table))
    kept = gguf_import.import_gguf(gguf_file, "kept", keep_quant=True)
    floats = gguf_import.import_gguf(gguf_file, "floats", keep_quant=False)
    reference, _ = stored_tensors(floats.path)
    loaded = load_quantized(kept.path / "model.safetensors")
    assert set(loaded.quantized) | set(loaded.floats) == set(reference)
    for name, value in reference.items():
        ours = dequantize(loaded.quantized[name]) if name in loaded.quantized else loaded.floats[name].float()
        assert torch.equal(ours, value), name
    # Every quantized tensor was kept (none dequantized), with its GGML type as its source.
    kept_types = {name: fmt.source for name, fmt in loaded.meta.tensors.items()}
    assert sorted(set(kept_types.values())) == sorted({f"gguf:{t}" for t in table.values() if t.startswith("Q")})
    assert kept_types["model.layers.0.self_attn.q_proj.weight"] == f"gguf:{table['attn_q']}"
    assert all(name.endswith("norm.weight") or "embed" in name for name in loaded.floats)
    summary = store.read_metadata(kept.path).quant
    assert summary["dequantized"] == {} and sum(summary["kept"].values()) == len(loaded.quantized)
    assert store.read_metadata(floats.path).quant is None
    assert json.loads((kept.path / "config.json").read_text()) == json.loads((floats.path / "config.json").read_text())


@pytest.mark.parametrize("table,checkpoint_fixture", [(Q4_1, "tiny_checkpoint"), (Q4_K, "wide_checkpoint")],
                         ids=["q4_1", "q4_k"])
def test_a_kept_import_is_at_most_1_15x_the_gguf(request, tmp_path, table, checkpoint_fixture):
    checkpoint = request.getfixturevalue(checkpoint_fixture)
    gguf_file = write_tiny_gguf(checkpoint, tmp_path / "m.gguf", tensor_type=typed(table))
    kept = gguf_import.import_gguf(gguf_file, "kept", keep_quant=True)
    floats = gguf_import.import_gguf(gguf_file, "floats")
    assert folder_bytes(kept.path) <= 1.15 * gguf_file.stat().st_size
    assert folder_bytes(floats.path) > 2 * folder_bytes(kept.path)


def test_types_without_an_exact_form_are_dequantized_and_named(tmp_path, wide_checkpoint, capsys):
    table = {**Q4_K, "ffn_down": "IQ4_NL"}
    gguf_file = write_tiny_gguf(wide_checkpoint, tmp_path / "iq.gguf", tensor_type=typed(table))
    kept = gguf_import.import_gguf(gguf_file, "iq", keep_quant=True)
    floats = gguf_import.import_gguf(gguf_file, "iq-floats")
    notes = capsys.readouterr().err
    loaded = load_quantized(kept.path / "model.safetensors")
    reference, _ = stored_tensors(floats.path)
    down = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
    for name in down:
        assert name not in loaded.quantized and torch.equal(loaded.floats[name], reference[name])
        assert f"{name} (IQ4_NL: no exact llmrun form)" in notes
    assert "dequantized to float32 (3): " in notes
    assert "kept the GGUF's quantized tensors: 20 Q4_K; float tensors as they are: 7 F32" in notes
    assert store.read_metadata(kept.path).quant["dequantized"] == {n: "IQ4_NL: no exact llmrun form" for n in down}


def test_the_metadata_block_lists_each_kept_tensor(tmp_path, wide_checkpoint):
    gguf_file = write_tiny_gguf(wide_checkpoint, tmp_path / "k.gguf", tensor_type=typed(K_MIXED))
    kept = gguf_import.import_gguf(gguf_file, "k", keep_quant=True)
    tensors, metadata = stored_tensors(kept.path)
    block = json.loads(metadata[METADATA_KEY])
    q4k = block["tensors"]["model.layers.1.self_attn.q_proj.weight"]
    assert q4k == {"bits": 4, "group": 32, "shape": [256, 256], "super_group": 256, "source": "gguf:Q4_K"}
    q6k = block["tensors"]["model.layers.1.self_attn.v_proj.weight"]
    assert (q6k["bits"], q6k["group"], q6k["source"]) == (8, 16, "gguf:Q6_K")
    assert tensors["model.layers.1.self_attn.q_proj.weight.scale_codes"].dtype == torch.uint8
    assert tensors["model.layers.1.self_attn.q_proj.weight.super_mins"].dtype == torch.float16
    assert "model.norm.weight" in block["kept_16bit"]


def unknown_type_gguf(path, tiny_checkpoint, type_number: int = 200):
    """The tiny GGUF with its first tensor's GGML type number replaced by `type_number`."""
    gguf_file = write_tiny_gguf(tiny_checkpoint, path)
    data = bytearray(gguf_file.read_bytes())
    name = b"token_embd.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    num_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * num_dims, type_number)
    gguf_file.write_bytes(bytes(data))
    return gguf_file


@pytest.mark.parametrize("keep_quant", [True, False])
def test_an_unknown_tensor_type_is_one_line(tmp_path, tiny_checkpoint, keep_quant):
    gguf_file = unknown_type_gguf(tmp_path / "new.gguf", tiny_checkpoint)
    with pytest.raises(InvalidModelError) as caught:
        gguf_import.import_gguf(gguf_file, "new", keep_quant=keep_quant)
    assert str(caught.value).startswith("new.gguf: tensor 'token_embd.weight' has GGML type number 200, "
                                        "unknown to gguf ")
    assert not (store.entry_path("new")).exists()


def test_the_import_command_keeps_by_default_and_dequantizes_on_request(tmp_path, tiny_checkpoint, hub_env):
    gguf_file = write_tiny_gguf(tiny_checkpoint, tmp_path / "q.gguf", tensor_type=typed(Q4_1))
    kept = run_cli(["import", str(gguf_file), "--name", "q"], tmp_path)  # LLMRUN_HOME: hub_env's
    assert kept.returncode == 0, kept.stderr
    assert "kept the GGUF's quantized tensors: 22 Q4_1, 1 Q8_0; float tensors as they are: 7 F32" in kept.stderr
    assert store.read_metadata(hub_env["store"] / "q").quant["kept"] == {"Q4_1": 22, "Q8_0": 1}
    again = run_cli(["import", str(gguf_file), "--name", "q"], tmp_path)
    assert "already holds q.gguf; nothing to import" in again.stderr
    floats = run_cli(["import", str(gguf_file), "--name", "q", "--dequantize"], tmp_path)
    assert floats.returncode == 0, floats.stderr
    assert "replaced the store entry 'q'" in floats.stderr and "kept the GGUF" not in floats.stderr
    assert store.read_metadata(hub_env["store"] / "q").quant is None
    unknown = run_cli(["import", str(unknown_type_gguf(tmp_path / "u.gguf", tiny_checkpoint))], tmp_path)
    assert_one_line_error(unknown, "u.gguf: tensor 'token_embd.weight' has GGML type number 200")
    help_text = run_cli(["import", "--help"], tmp_path).stdout
    assert "--keep-quant" in help_text and "--dequantize" in help_text
