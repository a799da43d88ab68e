"""Writing a tiny GGUF (F32 tensors, byte-level BPE tokenizer in metadata) from a tiny Llama checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_CONTROL_TOKEN_TYPE = 3
_NORMAL_TOKEN_TYPE = 1


def write_tiny_gguf(checkpoint: Path, out_file: Path, *, with_vocab_size: bool = True,
                    tensor_type=None) -> Path:
    """Write `checkpoint` (a tiny Llama saved by tests.checkpoints) as a llama.cpp-style GGUF: F32,
    or each tensor of the GGML type `tensor_type(gguf_name)` names (see `encode`); without
    `llama.vocab_size` readers count the tokenizer's tokens instead."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    tensors = load_file(str(checkpoint / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out_file), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope_theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta")
    writer.add_rope_freq_base(rope_theta or 10000.0)
    writer.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    if with_vocab_size:
        writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _add_tokenizer(writer, checkpoint)
    rng = np.random.default_rng(0)
    for name, array in tensors.items():
        gguf_name = _gguf_name(name)
        array = _llama_cpp_layout(name, array, config)
        type_name = tensor_type(gguf_name) if tensor_type is not None else "F32"
        data = encode(array, type_name, rng)
        writer.add_tensor(gguf_name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


# Where a block type keeps its fp16 fields (d, dmin), for blocks made of random bytes.
_HALF_FIELDS = {"Q2_K": (-4, -2), "Q3_K": (-2,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,), "IQ4_NL": (0,),
                "IQ4_XS": (0,)}


def encode(array, type_name: str, rng):
    """`array` (float32 [rows, cols]) as a GGUF tensor of GGML type `type_name`: F32/F16 as they are;
    types gguf-py can quantize (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) quantized from the values; others (K-quants,
    IQ4_NL, ...) random blocks with small fp16 scales, since gguf-py has no quantizer for them."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[type_name]
    if type_name == "F32":
        return array
    if type_name == "F16":
        return array.astype(np.float16)
    if type_name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        return gguf.quants.quantize(array, qtype)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (array.shape[0], array.shape[1] // block * size)).astype(np.uint8)
    blocks = raw.reshape(-1, size)
    for at in _HALF_FIELDS[type_name]:
        at = at % size
        halves = (rng.uniform(0.2, 1.0, blocks.shape[0]) * 1e-3).astype(np.float16)
        blocks[:, at:at + 2] = halves.reshape(-1, 1).view(np.uint8)
    return raw


def write_unknown_architecture_gguf(out_file: Path) -> Path:
    """A valid GGUF whose architecture ("fancyarch") no one supports, with one small tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(out_file), "fancyarch")
    writer.add_tensor("x.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_file


def _add_tokenizer(writer, checkpoint: Path) -> None:
    tokenizer = json.loads((checkpoint / "tokenizer.json").read_text())
    vocab = dict(tokenizer["model"]["vocab"])
    special = {token["content"]: token["id"] for token in tokenizer["added_tokens"]}
    vocab.update(special)
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    tokenizer_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([_CONTROL_TOKEN_TYPE if t in special else _NORMAL_TOKEN_TYPE for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[tokenizer_config["bos_token"]])
    writer.add_eos_token_id(vocab[tokenizer_config["eos_token"]])
    writer.add_chat_template((checkpoint / "chat_template.jinja").read_text())


def _gguf_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    _, _, layer, *module, _ = name.split(".")  # model.layers.<i>.<module...>.weight
    return f"blk.{layer}.{_LAYER_TENSORS['.'.join(module)]}.weight"


def _llama_cpp_layout(name: str, array, config: dict):
    """llama.cpp stores q/k rows interleaved per rotary pair; transformers undoes this on load."""
    import numpy as np

    if name.endswith("q_proj.weight"):
        array = _permute(array, config["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
        array = _permute(array, config["num_key_value_heads"])
    return np.ascontiguousarray(array, dtype=np.float32)


def _permute(weights, num_heads: int):
    rows = weights.shape[0]
    return (weights.reshape(num_heads, 2, rows // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))
