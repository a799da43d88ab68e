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


_TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def mistral_config(**overrides):
    """A tiny Mistral config with a 16-token sliding window on every layer."""
    from transformers import MistralConfig

    return MistralConfig(**{**_TINY, "sliding_window": 16, **overrides})


def qwen2_config(**overrides):
    """A tiny Qwen2 config (q/k/v biases); layers 1 and 2 slide over 16 tokens, layer 0 is full."""
    from transformers import Qwen2Config

    return Qwen2Config(**{**_TINY, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1,
                          "tie_word_embeddings": True, **overrides})


def qwen3_config(**overrides):
    """A tiny Qwen3 config: per-head q/k norms, head_dim 32 (heads × head_dim ≠ hidden, as in Qwen3)."""
    from transformers import Qwen3Config

    return Qwen3Config(**{**_TINY, "head_dim": 32, **overrides})


def longrope_parameters(rotary_dim: int, original: int = 32) -> dict:
    """Phi-3 128k style LongRoPE parameters with distinct short and long factors per frequency."""
    half = rotary_dim // 2
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": original,
            "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.5 + 0.75 * i for i in range(half)]}


def gemma2_config(**overrides):
    """A tiny Gemma 2 config: sliding (16) and global layers alternating, small soft-caps so that
    tanh bends the scores, and query_pre_attn_scalar different from head_dim."""
    from transformers import Gemma2Config

    values = {**_TINY, "head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 24,
              "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0, "tie_word_embeddings": True,
              "hidden_activation": "gelu_pytorch_tanh"}
    return Gemma2Config(**{**values, **overrides})


def gemma3_config(**overrides):
    """A tiny Gemma 3 text config: sliding, global, sliding layers; local RoPE base 10k, global 1M
    with linear scaling (as the larger Gemma 3 models use)."""
    from transformers import Gemma3TextConfig

    values = {**_TINY, "head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 24,
              "tie_word_embeddings": True, "sliding_window_pattern": 2,
              "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                     "rope_theta": 1000000.0}}}
    return Gemma3TextConfig(**{**values, **overrides})
