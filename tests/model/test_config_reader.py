"""llmrun's config.json reader against transformers' AutoConfig, family by family."""

import dataclasses
import json

import pytest
import transformers
from transformers import AutoConfig

from llmrun.errors import InvalidModelError
from llmrun.model.config import ModelConfig, model_config, read_config_json, sliding_windows
from llmrun.model.registry import FAMILIES, config_family
from tests import checkpoints

# The raw keys the decoders read (config.raw), beyond ModelConfig's own fields.
RAW_KEYS = ("sliding_window", "layer_types", "partial_rotary_factor", "query_pre_attn_scalar",
            "final_logit_softcapping", "attn_logit_softcapping", "eos_token_id")
CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
                  "phi3": "Phi3Config", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig"}


def via_autoconfig(folder, architecture) -> ModelConfig:
    """The route llmrun took before it read config.json itself: AutoConfig, then the same fields."""
    hf = AutoConfig.from_pretrained(folder)
    params = getattr(hf, "rope_parameters", None)
    if params:
        params = dict(params)
    else:
        params = {**dict(getattr(hf, "rope_scaling", None) or {}), "rope_theta": getattr(hf, "rope_theta", 10000.0)}
    num_heads = hf.num_attention_heads
    dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    return ModelConfig(
        architecture=architecture, model_type=hf.model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size, num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=num_heads, num_key_value_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
        rms_norm_eps=float(getattr(hf, "rms_norm_eps", 1e-6)), rope_parameters=params,
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(hf, "attention_bias", False)), mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        hidden_act=getattr(hf, "hidden_act", None) or getattr(hf, "hidden_activation", None) or "silu",
        checkpoint_dtype=str(dtype).replace("torch.", "") if dtype is not None else None, raw=hf.to_dict())


def ours(folder, architecture) -> ModelConfig:
    raw = read_config_json(folder)
    return model_config(raw, architecture, config_family(architecture, raw.get("model_type")))


def assert_same_config(folder, architecture):
    expected, got = via_autoconfig(folder, architecture), ours(folder, architecture)
    assert got == expected
    assert sliding_windows(got) == sliding_windows(expected)
    for key in RAW_KEYS:
        assert got.raw.get(key) == expected.raw.get(key), key


def write_config(tmp_path, name, raw):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    return folder


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_family_defaults_are_its_transformers_config_class_defaults(family):
    fields = {f.name: f for f in dataclasses.fields(getattr(transformers, CONFIG_CLASSES[family.model_type]))}
    for key, value in family.config_defaults.items():
        assert key in fields, key
        default = fields[key].default
        assert default is not dataclasses.MISSING, key
        assert value == default, key


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.model_type)
def test_a_config_naming_only_its_family_gets_transformers_defaults(tmp_path, family):
    raw = {"architectures": [family.architecture], "model_type": family.model_type}
    assert_same_config(write_config(tmp_path, "bare", raw), family.architecture)


BUILDERS = ("llama_config", "mistral_config", "qwen2_config", "qwen3_config", "phi3_config", "gemma2_config",
            "gemma3_config")


@pytest.mark.parametrize("builder", BUILDERS)
def test_each_test_checkpoint_config_reads_as_through_autoconfig(tmp_path, builder):
    config = getattr(checkpoints, builder)()
    config.save_pretrained(tmp_path)
    architecture = next(f.architecture for f in FAMILIES if f.model_type == config.model_type)
    assert_same_config(tmp_path, architecture)


VARIANTS = {
    "llama3_rope_legacy_keys": ("LlamaForCausalLM", {
        "model_type": "llama", "rope_theta": 500000.0, "torch_dtype": "bfloat16", "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}}),
    "llama_linear_type_key": ("LlamaForCausalLM", {
        "model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}, "num_key_value_heads": 8,
        "head_dim": 64, "partial_rotary_factor": 0.5, "dtype": "float16", "tie_word_embeddings": True}),
    "mistral_no_window": ("MistralForCausalLM", {"model_type": "mistral", "sliding_window": None, "rope_theta": 1e6}),
    "qwen2_sliding_on": ("Qwen2ForCausalLM", {
        "model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 3, "num_hidden_layers": 6}),
    "qwen3_given_layer_types": ("Qwen3ForCausalLM", {
        "model_type": "qwen3", "use_sliding_window": True, "num_hidden_layers": 2, "sliding_window": 64,
        "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3_longrope_su": ("Phi3ForCausalLM", {
        "model_type": "phi3", "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
        "rope_scaling": {"type": "yarn", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}}),
    "phi3_partial_rotary": ("Phi3ForCausalLM", {"model_type": "phi3", "partial_rotary_factor": 0.75,
                                                "sliding_window": 2047}),
    "gemma2_hidden_act_too": ("Gemma2ForCausalLM", {
        "model_type": "gemma2", "hidden_act": "gelu_pytorch_tanh", "final_logit_softcapping": None}),
    "gemma3_legacy_rope": ("Gemma3ForCausalLM", {
        "model_type": "gemma3_text", "rope_scaling": {"rope_type": "linear", "factor": 8.0},
        "rope_local_base_freq": 20000.0, "rope_theta": 2e6, "sliding_window_pattern": 3, "num_hidden_layers": 7}),
    "gemma3_bidirectional": ("Gemma3ForCausalLM", {
        "model_type": "gemma3_text", "use_bidirectional_attention": True, "sliding_window": 513}),
    "llama_model_type_mistral": ("LlamaForCausalLM", {"model_type": "mistral"}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_optional_and_legacy_fields_read_as_through_autoconfig(tmp_path, name):
    architecture, raw = VARIANTS[name]
    assert_same_config(write_config(tmp_path, name, {"architectures": [architecture], **raw}), architecture)


@pytest.mark.parametrize("raw, message", [
    ({"vocab_size": "many"}, "vocab_size must be a positive integer"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"rope_scaling": {"rope_type": "linear"}}, "RoPE type 'linear' needs factor"),
])
def test_a_broken_config_is_one_invalid_model_error(raw, message):
    family = config_family("LlamaForCausalLM", "llama")
    with pytest.raises(InvalidModelError, match=message):
        model_config({"architectures": ["LlamaForCausalLM"], "model_type": "llama", **raw}, "LlamaForCausalLM", family)


def test_phi3_su_rope_without_its_pretraining_length_is_refused_as_by_transformers(tmp_path):
    raw = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
           "rope_scaling": {"type": "su", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}}
    folder = write_config(tmp_path, "su", raw)
    with pytest.raises(KeyError, match="original_max_position_embeddings"):
        AutoConfig.from_pretrained(folder)
    with pytest.raises(InvalidModelError, match="RoPE type 'longrope' needs original_max_position_embeddings"):
        ours(folder, "Phi3ForCausalLM")
