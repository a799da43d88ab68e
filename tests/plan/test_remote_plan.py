"""Planning a model that is not downloaded: config + safetensors headers from the Hub, or advice offline."""

import json

import pytest
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo

from llmrun.errors import ModelUnavailableError
from llmrun.plan import inputs as plan_inputs_module
from llmrun.plan.make import PlanRequest, make_plan
from tests.checkpoints import llama_config


@pytest.fixture()
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return tmp_path


def fake_hub(monkeypatch, tmp_path, calls):
    import huggingface_hub

    config = llama_config(num_hidden_layers=4).to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    tensors, offset = {}, 0
    shapes = {"model.embed_tokens.weight": [320, 64], "model.norm.weight": [64], "lm_head.weight": [320, 64]}
    for i in range(4):
        for name, shape in (("self_attn.q_proj", [64, 64]), ("self_attn.k_proj", [32, 64]),
                            ("self_attn.v_proj", [32, 64]), ("self_attn.o_proj", [64, 64]),
                            ("mlp.gate_proj", [128, 64]), ("mlp.up_proj", [128, 64]), ("mlp.down_proj", [64, 128])):
            shapes[f"model.layers.{i}.{name}.weight"] = shape
        shapes[f"model.layers.{i}.input_layernorm.weight"] = [64]
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = [64]
    for name, shape in shapes.items():
        size = 4
        for dim in shape:
            size *= dim
        tensors[name] = TensorInfo(dtype="F32", shape=shape, data_offsets=(offset, offset + size))
        offset += size
    metadata = SafetensorsRepoMetadata(metadata=None, sharded=False, weight_map={n: "model.safetensors" for n in tensors},
                                       files_metadata={"model.safetensors": SafetensorsFileMetadata({}, tensors)})

    class Info:
        sha = "a" * 40

    def model_info(self, repo_id, **kwargs):
        calls.append(("info", repo_id))
        return Info()

    def download(repo_id, filename, **kwargs):
        calls.append(("download", repo_id, filename))
        return str(config_file)

    def safetensors_metadata(repo_id, **kwargs):
        calls.append(("metadata", repo_id))
        return metadata

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", safetensors_metadata)


def test_absent_model_is_planned_from_hub_headers(empty_home, monkeypatch):
    calls = []
    fake_hub(monkeypatch, empty_home, calls)
    inputs = plan_inputs_module.plan_inputs("llama-3.2-1b")
    assert inputs.folder is None and inputs.architecture == "LlamaForCausalLM"
    assert ("metadata", "meta-llama/Llama-3.2-1B-Instruct") in calls
    assert calls.count(("download", "meta-llama/Llama-3.2-1B-Instruct", "config.json")) == 1
    report = make_plan(inputs.config, inputs.index, PlanRequest(gpu_mem_bytes=0, cpu_mem_bytes=10**9, ctx=128, dtype="bfloat16"))
    assert report.placement.sizes.num_layers == 4
    assert report.placement.sizes.lm_head_bytes == 320 * 64 * 2  # F32 headers, sized in the bf16 run dtype


def test_offline_says_what_is_missing_without_network(empty_home, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def forbidden(*args, **kwargs):
        raise AssertionError("no network call is allowed offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", forbidden)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", forbidden)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", forbidden)
    with pytest.raises(ModelUnavailableError, match="llmrun pull phi-3-mini"):
        plan_inputs_module.plan_inputs("phi-3-mini")


def test_unreachable_hub_fails_fast_with_advice(empty_home, monkeypatch):
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(ModelUnavailableError, match=r"Hub cannot be reached .*run `llmrun pull phi-3-mini`"):
        plan_inputs_module.plan_inputs("phi-3-mini")
