"""llmrun's quantizer: error within half a step per weight, float16-exact scales, the spec's checks."""

import pytest
import torch

from llmrun.errors import UsageError
from llmrun.quant import quantize as quantize_module
from llmrun.quant.format import dequantize, unpack_int4
from llmrun.quant.stored import stored_tensors
from llmrun.quant.quantize import quantize_weight
from llmrun.quant.spec import QuantSpec, check_groups, compressed, planned_index, quantizable
from llmrun.weights.index import CheckpointIndex, TensorInfo


def weight(out=8, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    w[0, 5] = 0.9  # an outlier: its group's scale grows, the others' do not
    w[3] = 0.0  # a row of zeros: scale 0, every value exact
    return w


@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(4, 64), QuantSpec(4, 128), QuantSpec(8, 0),
                                  QuantSpec(8, 32)])
def test_each_weight_takes_its_nearest_level(spec):
    w = weight()
    qw = quantize_weight(w, spec)
    group = spec.group_for(w.shape[1])
    steps = qw.scales.repeat_interleave(group, dim=1)  # [out, in]
    error = (dequantize(qw) - w).abs()
    if spec.bits == 8:  # symmetric over max |w|: every weight lies inside the grid
        assert bool((error <= steps * 0.5 * (1 + 1e-5) + 1e-7).all())
    else:  # no other of the 16 levels is closer
        q = unpack_int4(qw.qweight).to(torch.float32)
        mins = qw.mins.repeat_interleave(group, dim=1)
        for other in (q - 1, q + 1):
            inside = (other >= 0) & (other <= 15)
            assert bool((error <= (other * steps + mins - w).abs() + 1e-7)[inside].all())
    assert torch.equal(dequantize(qw)[3], torch.zeros(w.shape[1]))
    assert qw.group_size == group and qw.bits == spec.bits
    # scales and mins were chosen as float16 values: the stored file keeps them exactly in 16 bits
    assert stored_tensors("w", qw)["w.scales"].dtype == torch.float16


@pytest.mark.parametrize("group", [32, 64, 128])
def test_the_int4_fit_beats_the_min_max_grid(group, monkeypatch):
    """Least squares per group: less squared error than the min/max grid (an outlier stretches that)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    w[::5, ::37] *= 8
    fitted = ((dequantize(quantize_weight(w, QuantSpec(4, group))) - w) ** 2).sum()
    monkeypatch.setattr(quantize_module, "FIT_ROUNDS", 0)
    min_max = ((dequantize(quantize_weight(w, QuantSpec(4, group))) - w) ** 2).sum()
    assert fitted < 0.95 * min_max


def test_groups_keep_an_outlier_local():
    w = weight()
    per_channel = (dequantize(quantize_weight(w, QuantSpec(8, 0))) - w)[0].abs().mean()
    grouped = (dequantize(quantize_weight(w, QuantSpec(8, 32))) - w)[0].abs().mean()
    assert grouped < per_channel / 2


@pytest.mark.parametrize("kind, group, fragment", [
    ("int5", None, "unknown quantization 'int5'"),
    ("int4", 48, "int4 groups are 32, 64, 128, not 48"),
    ("int8", 24, "int8 groups are multiples of 16"),
])
def test_specs_outside_the_format_are_refused(kind, group, fragment):
    with pytest.raises(UsageError, match=fragment):
        QuantSpec.parse(kind, group)


def test_defaults_and_labels():
    assert QuantSpec.parse("int4").label == "int4-g32"
    assert QuantSpec.parse("int8").label == "int8-channel"
    assert QuantSpec.parse("int8", 64).label == "int8-g64"


def _index(shapes):
    return CheckpointIndex(None, {n: TensorInfo(n, None, "BF16", s, 0, 2 * s[0] * s[-1]) for n, s in shapes.items()})


def test_layer_matmuls_and_the_output_head_are_compressed_and_the_planner_counts_their_parts():
    """The layers' matmuls take the format asked for, the output head int8 in groups of 32 (an
    untied model's input embeddings stay 16-bit; tied, the table is the head and is compressed)."""
    shapes = {"model.embed_tokens.weight": (320, 576), "model.layers.0.mlp.down_proj.weight": (576, 1536),
              "model.layers.0.input_layernorm.weight": (576,), "lm_head.weight": (320, 576)}
    index = _index(shapes)
    assert [n for n, i in index.tensors.items() if quantizable(n, i.shape)] == ["model.layers.0.mlp.down_proj.weight"]
    assert compressed(index, QuantSpec(4, 64)) == {"model.layers.0.mlp.down_proj.weight": QuantSpec(4, 64),
                                                   "lm_head.weight": QuantSpec(8, 32)}
    planned = planned_index(index, QuantSpec(4, 64))
    parts = {n: (i.dtype, i.shape) for n, i in planned.tensors.items() if "down_proj" in n or "lm_head" in n}
    assert parts == {"model.layers.0.mlp.down_proj.weight.qweight": ("U8", (576, 768)),
                     "model.layers.0.mlp.down_proj.weight.scales": ("F32", (576, 24)),
                     "model.layers.0.mlp.down_proj.weight.mins": ("F32", (576, 24)),
                     "lm_head.weight.qweight": ("I8", (320, 576)), "lm_head.weight.scales": ("F32", (320, 18))}
    assert "model.embed_tokens.weight" in planned.tensors and "lm_head.weight" not in planned.tensors
    from llmrun.plan.model_sizes import model_sizes

    config = {"num_hidden_layers": 1, "hidden_size": 576, "num_attention_heads": 9, "vocab_size": 320}
    assert model_sizes(planned, config, 2).head_compressed and not model_sizes(index, config, 2).head_compressed
    del shapes["lm_head.weight"]  # tied
    assert compressed(_index(shapes), QuantSpec(8, 0))["model.embed_tokens.weight"] == QuantSpec(8, 32)


def test_a_group_that_does_not_divide_a_layer_names_it():
    index = _index({"model.layers.0.self_attn.o_proj.weight": (576, 576)})
    fragment = "group 128 does not divide model.layers.0.self_attn.o_proj.weight's 576 inputs"
    with pytest.raises(UsageError, match=fragment):
        check_groups(index, QuantSpec(4, 128))


def test_the_plan_reserves_dequantized_matrices_for_prompt_chunks():
    """A prompt chunk of a compressed model dequantizes one matrix at a time to the run dtype: the
    workspace holds the largest (q/k/v and gate/up fused as they run); on the CPU, where a step's
    prompt chunks run in lockstep and share a layer's dequantized matrices (batch > 1), the whole
    layer's; and the head too where more rows ask for logits than the decode kernel reads packed
    (16 on the CPU, 1 on a GPU)."""
    from llmrun.plan.model_sizes import model_sizes
    from llmrun.plan.placement import workspace_bytes
    from llmrun.plan.tiers import PlanOptions, Tier

    shapes = {f"model.layers.0.mlp.{m}_proj.weight": (1536, 576) for m in ("gate", "up")}
    shapes.update({"model.layers.0.mlp.down_proj.weight": (576, 1536), "model.embed_tokens.weight": (4096, 576)})
    index = _index(shapes)
    config = {"num_hidden_layers": 1, "hidden_size": 576, "num_attention_heads": 9, "vocab_size": 4096,
              "intermediate_size": 1536, "tie_word_embeddings": True}
    largest, layer, head_bytes = 2 * 1536 * 576 * 2, 3 * 1536 * 576 * 2, 4096 * 576 * 2  # in bf16
    for bits in (4, 8):
        sizes = model_sizes(planned_index(index, QuantSpec(bits, 32)), config, 2)  # the tied head in int8 too
        assert sizes.head_compressed
        assert (sizes.dequantized_bytes, sizes.layer_dequantized_bytes) == (largest, layer)
        plain = model_sizes(index, config, 2)
        for batch, fast, matrices, with_head in ((1, Tier.CPU, largest, False), (16, Tier.CPU, layer, False),
                                                 (17, Tier.CPU, layer, True), (2, Tier.GPU, largest, True)):
            options = PlanOptions(ctx=256, batch=batch, dtype_bytes=2)
            extra = workspace_bytes(sizes, options, fast) - workspace_bytes(plain, options, fast)
            assert extra == max(matrices, head_bytes if with_head else 0), (bits, batch, fast)
