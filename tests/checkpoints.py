"""Builders for tiny random checkpoints (transformers' own config classes) and a small tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "Large language models run locally on a laptop with a small GPU or no GPU at all.",
    "Hello, how are you today? I am fine, thank you for asking.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: ! ? , . ; : - + * / = ( ) [ ] { }",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z A B C D E F G H I J K L M N O P",
]


def save_tokenizer(folder: Path, vocab_size: int = 320) -> None:
    """Train a tiny byte-level BPE tokenizer and save it (with a chat template) into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def tokenizer_vocab_size(folder: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(folder))


def save_checkpoint(folder: Path, config, *, seed: int = 0, dtype=None, max_shard_size=None):
    """Instantiate a random model for `config`, save it with safetensors plus a tokenizer.

    Returns the folder. The model's vocab matches the tokenizer (320 tokens unless the config
    asks for more; extra ids are simply never produced by the tokenizer).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init uses std 0.02: scale up so logits are not all near-equal (greedy ties).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08)
            elif "norm" in name:
                param.uniform_(0.8, 1.2)
            else:
                param.normal_(0.0, 0.05)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(folder, **kwargs)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id
    ).save_pretrained(folder)
    return folder


def llama_config(**overrides):
    """A tiny Llama config: GQA by default (4 heads, 2 KV heads)."""
    from transformers import LlamaConfig

    values = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def save_sparse_checkpoint(folder: Path, config, *, dtype: str = "F16", num_shards: int = 1) -> Path:
    """A checkpoint whose safetensors headers describe every tensor of `config`'s model, with the
    data region left as a sparse hole (no bytes written): for planning, which reads headers only.
    """
    import struct

    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if config.tie_word_embeddings:
        params = [(n, s) for n, s in params if n != "lm_head.weight"]
    elem = {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    shards = [params[i::num_shards] for i in range(num_shards)]
    weight_map = {}
    for idx, shard in enumerate(shards):
        name = "model.safetensors" if num_shards == 1 else f"model-{idx + 1:05d}-of-{num_shards:05d}.safetensors"
        header, offset = {}, 0
        for tensor, shape in shard:
            size = elem
            for dim in shape:
                size *= dim
            header[tensor] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[tensor] = name
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / name, "wb") as handle:
            handle.write(struct.pack("<Q", len(raw)) + raw)
            handle.truncate(8 + len(raw) + offset)
    if num_shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.architectures = [type(model).__name__]
    config.save_pretrained(folder)
    save_tokenizer(folder)
    return folder


def phi3_mini_config():
    """Phi-3-mini's shape (Phi3Config defaults: 32 layers, hidden 3072, 4k context)."""
    from transformers import Phi3Config

    return Phi3Config()


def llama_70b_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=131072, rope_theta=500000.0)


def phi3_config(**overrides):
    """A tiny Phi-3 config (fused qkv_proj / gate_up_proj)."""
    from transformers import Phi3Config

    values = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  original_max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    values.update(overrides)
    return Phi3Config(**values)
