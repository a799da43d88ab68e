"""Quantize-on-load through the real engine: the QuantWeights it runs hold exactly llmrun's quantizer's
values in the right places (q/k/v and gate/up stacked), checked by teacher-forced NLL against
transformers on the same dequantized weights; the cache entry is made once and reused."""

import pytest
import torch
import torch.nn.functional as F

from llmrun.bench.perplexity import perplexity
from llmrun.engine.build import EngineOptions, build_engine
from llmrun.quant.format import QuantWeight, dequantize
from llmrun.quant.quantize import quantize_weight
from llmrun.quant.spec import QuantSpec, compressed
from llmrun.weights.index import build_index
from tests.checkpoints import llama_config, save_checkpoint

IDS = [(7 * i * i + 3 * i + 5) % 317 + 3 for i in range(45)]  # 45 tokens: chunks of 16 cross block edges


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("q") / "tiny", llama_config(), seed=5)


def transformers_nll(folder, spec: QuantSpec | None, ids: list[int] = IDS) -> float:
    """Summed NLL of ids[1:] by transformers in float32, its layer matmuls and output head replaced by
    llmrun's quantizer's dequantized values (as spec.compressed says) when `spec` is given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    specs = compressed(build_index(folder), spec) if spec is not None else {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in specs:
                param.copy_(dequantize(quantize_weight(param, specs[name])))
        logits = model(torch.tensor([ids])).logits[0]
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()


def engine_nll(folder, quant: str, ids: list[int] = IDS) -> tuple[float, object]:
    engine = build_engine(folder, EngineOptions(gpu_mem_bytes=0, dtype="float32", quant=quant))
    with engine:
        result = perplexity(engine, ids, chunk=16)
        assert result.num_scored == len(ids) - 1
        return result.mean_nll * result.num_scored, engine.weights


@pytest.mark.parametrize("quant, spec", [("int4", QuantSpec(4, 32)), ("int8", QuantSpec(8, 0))])
def test_quantized_engine_scores_like_transformers_on_the_dequantized_weights(tiny, tmp_path, monkeypatch,
                                                                              quant, spec):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    nll, weights = engine_nll(tiny, quant)
    assert isinstance(weights.resident[0]["qkv"], QuantWeight)
    assert isinstance(weights.resident[2]["gate_up"], QuantWeight)
    assert weights.resident[0]["qkv"].bits == spec.bits
    head = weights.resident[weights.head_unit]["head"]  # the head in int8 groups of 32
    assert isinstance(head, QuantWeight) and (head.bits, head.group_size) == (8, 32)
    expected = transformers_nll(tiny, spec)
    assert nll == pytest.approx(expected, rel=2e-5)
    assert abs(nll - transformers_nll(tiny, None)) > 1e-4 * expected  # the quantization is really there


def test_a_tied_head_in_int8_is_also_the_table_its_embeddings_are_looked_up_in(tmp_path, monkeypatch):
    """Tied embeddings are the head: compressed with it, their rows dequantized from the resident
    head itself (no float copy of the table), as transformers scores the dequantized table."""
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    tied = save_checkpoint(tmp_path / "tied", llama_config(tie_word_embeddings=True), seed=6)
    assert compressed(build_index(tied), QuantSpec(4, 32))["model.embed_tokens.weight"] == QuantSpec(8, 32)
    nll, weights = engine_nll(tied, "int4")
    head = weights.resident[weights.head_unit]["head"]
    assert isinstance(head, QuantWeight) and head.bits == 8 and weights._embed_table is head
    assert nll == pytest.approx(transformers_nll(tied, QuantSpec(4, 32)), rel=2e-5)


def test_float_perplexity_matches_transformers(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    nll, weights = engine_nll(tiny, "none")
    assert not weights.quant.formats
    assert nll == pytest.approx(transformers_nll(tiny, None), rel=1e-5)


def test_a_last_chunk_of_one_token_predicts_nothing_and_is_not_scored(tiny, tmp_path, monkeypatch):
    """33 tokens in chunks of 16: the last chunk's one row has no next token to score (a text of 513
    tokens does this at the command's 512-token chunks)."""
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    nll, _ = engine_nll(tiny, "none", IDS[:33])
    assert nll == pytest.approx(transformers_nll(tiny, None, IDS[:33]), rel=1e-5)


def test_the_cache_entry_is_made_once_and_reused(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    engine_nll(tiny, "int4")
    (entry,) = (tmp_path / "home" / "offload").glob("*/quantized.safetensors")
    made = entry.stat().st_mtime_ns
    engine_nll(tiny, "int4")
    assert entry.stat().st_mtime_ns == made
    assert not [p for p in entry.parent.iterdir() if p.name.endswith(".tmp")]
    engine_nll(tiny, "int8")  # another spec: another entry
    assert len(list((tmp_path / "home" / "offload").glob("*/quantized.safetensors"))) == 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_quantized_layers_score_as_resident_ones(tiny, tmp_path, monkeypatch, dtype):
    """At the smallest budget the layers stream from disk a matrix at a time: their packed parts are
    staged as stored (bf16 runs go through the offload cache, which keeps them as they are) and
    assembled into the same QuantWeights, so the scores agree with the resident run's."""
    from tests.placements import floor_budget

    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))
    scores = []
    for budget in (None, floor_budget(tiny, quant="int4", dtype=dtype)):
        engine = build_engine(tiny, EngineOptions(gpu_mem_bytes=0, cpu_mem_bytes=budget, dtype=dtype, quant="int4"))
        with engine:
            assert (engine.weights.streamer is not None) == (budget is not None)
            result = perplexity(engine, IDS, chunk=16)
            scores.append(result.mean_nll)
    assert scores[1] == pytest.approx(scores[0], rel=1e-5)
