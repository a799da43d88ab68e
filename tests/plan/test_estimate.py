"""The speed estimate as a pure function: which figures it reads and says where they came from, the
page cache, learning from what runs achieve, quantized and float weights under the same rule."""

import json
import struct

import pytest

from llmrun.plan.calibration import ASSUMED, ASSUMED_FIGURES, PROBE, RUNS, Figure
from llmrun.plan.estimate import SHORT_CONTEXT, PageCacheOutlook, estimate_speed, learnt_figures
from llmrun.plan.model_sizes import ModelSizes, model_sizes
from llmrun.plan.placement import plan
from llmrun.plan.tiers import Budgets, PlanOptions, Tier
from llmrun.weights.index import build_index

MB = 1_000_000
WARM = PageCacheOutlook(resident_fraction=None, room_bytes=10**12)
NO_ROOM = PageCacheOutlook(resident_fraction=0.25, room_bytes=0)


def toy(layer=100 * MB, num_layers=8, kv_per_token=1000):
    return ModelSizes(
        layer_bytes=(layer,) * num_layers, embed_bytes=50 * MB, lm_head_bytes=50 * MB, other_bytes=1000,
        tied_embeddings=False, kv_bytes_per_token=kv_per_token, hidden_size=64, intermediate_size=128,
        vocab_size=1000, num_attention_heads=4, max_context=8192, dtype_bytes=2,
    )


def options(ctx=1024):
    return PlanOptions(ctx=ctx, dtype_bytes=2, batch=1, block_size=16, gpu_runtime_bytes=100 * MB)


def figures(**values):
    """The assumed figures, with `values` as measured by a probe (name -> value)."""
    out = {name: Figure(value, ASSUMED) for name, value in ASSUMED_FIGURES.items()}
    out.update({name.replace("__", "/"): Figure(value, PROBE) for name, value in values.items()})
    return out


def resident_cpu():
    return plan(toy(), Budgets(None, 10_000 * MB), options())


def disk_streamed_cpu():
    placement = plan(toy(), Budgets(None, 600 * MB), options())
    assert placement.streamed_bytes_per_token(Tier.DISK) > 0 and placement.compute_tier is Tier.CPU
    return placement


def cpu_streamed_gpu():
    placement = plan(toy(), Budgets(700 * MB, 10_000 * MB), options())
    assert placement.streamed_bytes_per_token(Tier.CPU) > 0 and not placement.streamed_bytes_per_token(Tier.DISK)
    return placement


def read_bytes(placement, ctx_tokens):
    sizes = placement.sizes
    return sum(sizes.layer_bytes) + sizes.head_bytes + sizes.other_bytes + sizes.kv_bytes_per_token * ctx_tokens


def test_resident_decode_is_its_reads_plus_a_cost_per_layer():
    placement = resident_cpu()
    est = estimate_speed(placement, figures(cpu_read_bytes_s=10e9, cpu_layer_step_s=1e-3), "bfloat16", WARM)
    step_s = read_bytes(placement, SHORT_CONTEXT) / 10e9 + 8 * 1e-3
    assert est.decode_tok_s_low == pytest.approx(1 / step_s) and est.decode_tok_s_high == pytest.approx(1 / step_s)
    full_s = read_bytes(placement, 1024) / 10e9 + 8 * 1e-3
    assert est.decode_tok_s_full_ctx == pytest.approx(1 / full_s)
    assert est.read_bytes_per_token == read_bytes(placement, SHORT_CONTEXT)
    assert set(est.figures) == {"compute_read", "layer_step"}  # nothing streams: no transfer figure
    assert all(f.source == PROBE and f.measured for f in est.figures.values())


def test_each_figure_says_assumed_until_measured():
    placement = plan(toy(), Budgets(700 * MB, 400 * MB), options())
    assert placement.streamed_bytes_per_token(Tier.DISK) and placement.streamed_bytes_per_token(Tier.CPU)
    est = estimate_speed(placement, figures(), "float16", WARM)
    assert set(est.figures) == {"compute_read", "layer_step", "page_cache_read", "disk_read", "host_to_gpu"}
    assert all(f.source == ASSUMED and not f.measured for f in est.figures.values())
    measured = estimate_speed(placement, figures(host_to_gpu_bytes_s=50e9), "float16", WARM)
    assert measured.figures["host_to_gpu"] == Figure(50e9, PROBE)
    assert measured.decode_tok_s_low > est.decode_tok_s_low  # the faster link is used


def test_a_step_cost_learnt_for_the_dtype_is_used_for_that_dtype_only():
    placement = resident_cpu()
    values = figures(cpu_layer_step_s__bfloat16=5e-3)
    assert estimate_speed(placement, values, "bfloat16", WARM).figures["layer_step"].value == 5e-3
    assert estimate_speed(placement, values, "float32", WARM).figures["layer_step"].source == ASSUMED


def test_disk_reads_come_from_the_page_cache_when_it_has_room():
    placement = disk_streamed_cpu()
    from_disk = placement.streamed_bytes_per_token(Tier.DISK)
    values = figures(cpu_read_bytes_s=10e9, cpu_layer_step_s=1e-3, page_cache_read_bytes_s=5e9,
                     disk_read_bytes_s=1e9)
    compute_s = read_bytes(placement, SHORT_CONTEXT) / 10e9 + 8e-3
    warm = estimate_speed(placement, values, "float32", WARM)
    assert warm.disk_warm and warm.decode_tok_s_low == pytest.approx(1 / (compute_s + from_disk / 5e9))
    assert warm.decode_tok_s_high == pytest.approx(1 / max(compute_s, from_disk / 5e9))
    cold = estimate_speed(placement, values, "float32", NO_ROOM)
    assert not cold.disk_warm and cold.decode_tok_s_low == pytest.approx(1 / (compute_s + from_disk / 1e9))
    # the first pass: a quarter in the page cache now (mincore), the rest from the disk
    assert cold.first_read_s == pytest.approx(from_disk * (0.25 / 5e9 + 0.75 / 1e9))
    assert cold.resident_fraction == 0.25


def test_16_bit_layers_streamed_to_a_cpu_are_computed_at_their_own_rate():
    """Streamed bf16/fp16 layers run from staged, unpacked weights (resident ones are prepacked): their
    bytes are computed at the unpacked rate (assumed until a run teaches it, per dtype); float32's
    streamed layers run as the resident ones do."""
    placement = disk_streamed_cpu()
    from_disk = placement.streamed_bytes_per_token(Tier.DISK)
    values = figures(cpu_read_bytes_s=10e9, cpu_layer_step_s=1e-3, page_cache_read_bytes_s=5e9)
    bf16 = estimate_speed(placement, values, "bfloat16", WARM)
    assert bf16.figures["unpacked_read"] == Figure(ASSUMED_FIGURES["cpu_unpacked_read_bytes_s"], ASSUMED)
    compute_s = ((read_bytes(placement, SHORT_CONTEXT) - from_disk) / 10e9 + 8e-3
                 + from_disk / ASSUMED_FIGURES["cpu_unpacked_read_bytes_s"])
    assert bf16.decode_tok_s_low == pytest.approx(1 / (compute_s + from_disk / 5e9))
    assert "unpacked_read" not in estimate_speed(placement, values, "float32", WARM).figures
    assert "unpacked_read" not in estimate_speed(resident_cpu(), values, "bfloat16", WARM).figures
    learnt = figures(cpu_read_bytes_s=10e9, cpu_layer_step_s=1e-3, page_cache_read_bytes_s=5e9,
                     cpu_unpacked_read_bytes_s__float16=1e9)
    assert estimate_speed(placement, learnt, "float16", WARM).figures["unpacked_read"] == Figure(1e9, PROBE)
    assert estimate_speed(placement, learnt, "bfloat16", WARM).figures["unpacked_read"].source == ASSUMED


@pytest.mark.parametrize("kind", ["resident", "resident_fast", "disk_warm", "disk_cold", "disk_bf16", "gpu_link"])
def test_a_run_teaches_the_figure_its_placement_exercises(kind):
    """Learning from a run at step_s seconds a token, then estimating again, gives that run's speed."""
    values = figures(cpu_read_bytes_s=10e9, page_cache_read_bytes_s=5e9, disk_read_bytes_s=1e9,
                     gpu_read_bytes_s=1e12, host_to_gpu_bytes_s=20e9)
    placement, outlook, step_s, name, end, dtype = {
        "resident": (resident_cpu(), WARM, 0.5, "cpu_layer_step_s/bfloat16", "low", "bfloat16"),
        "resident_fast": (resident_cpu(), WARM, 0.01, "cpu_read_bytes_s", "low", "bfloat16"),
        "disk_warm": (disk_streamed_cpu(), WARM, 0.5, "page_cache_read_bytes_s", "low", "float32"),
        "disk_cold": (disk_streamed_cpu(), NO_ROOM, 0.9, "disk_read_bytes_s", "low", "float32"),
        "disk_bf16": (disk_streamed_cpu(), WARM, 0.5, "cpu_unpacked_read_bytes_s/bfloat16", "low", "bfloat16"),
        "gpu_link": (cpu_streamed_gpu(), WARM, 0.2, "host_to_gpu_bytes_s", "high", "bfloat16"),
    }[kind]
    before = estimate_speed(placement, values, dtype, outlook)
    learnt = learnt_figures(placement, before, dtype, step_s)
    assert name in learnt and all(f.source == RUNS for f in learnt.values())
    after = estimate_speed(placement, {**values, **learnt}, dtype, outlook)
    assert getattr(after, f"decode_tok_s_{end}") == pytest.approx(1 / step_s)
    role = {"cpu_layer_step_s/bfloat16": "layer_step", "cpu_read_bytes_s": "compute_read",
            "page_cache_read_bytes_s": "page_cache_read", "disk_read_bytes_s": "disk_read",
            "cpu_unpacked_read_bytes_s/bfloat16": "unpacked_read", "host_to_gpu_bytes_s": "host_to_gpu"}[name]
    assert after.figures[role].source == RUNS


def test_a_streamed_run_faster_than_its_compute_teaches_nothing():
    placement = disk_streamed_cpu()
    est = estimate_speed(placement, figures(cpu_read_bytes_s=10e9), "bfloat16", WARM)
    assert learnt_figures(placement, est, "bfloat16", step_s=0.001) == {}


def _header_only(folder, tensors: dict) -> None:
    """A safetensors file with these headers ({name: (dtype, shape)}) and no data (a sparse hole)."""
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "U8": 1}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = sizes[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "model.safetensors", "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)) + raw)
        handle.truncate(8 + len(raw) + offset)


def test_quantized_and_float_weights_take_the_same_estimate(tmp_path):
    """An int4 checkpoint (uint8 qweight, float16 scales and mins per group of 32) and its bf16 twin:
    each estimate reads the bytes its index holds, at the same rates."""
    config = {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
              "vocab_size": 1000, "max_position_embeddings": 512, "tie_word_embeddings": True}
    shapes = {"self_attn.q_proj": (256, 256), "mlp.gate_proj": (512, 256), "mlp.down_proj": (256, 512)}

    def tensors(quantized: bool) -> dict:
        out = {"model.embed_tokens.weight": ("BF16", (1000, 256)), "model.norm.weight": ("BF16", (256,))}
        for layer in range(2):
            for name, (rows, cols) in shapes.items():
                base = f"model.layers.{layer}.{name}"
                if quantized:
                    out[f"{base}.qweight"] = ("U8", (rows, cols // 2))
                    out[f"{base}.scales"] = ("F16", (rows, cols // 32))
                    out[f"{base}.mins"] = ("F16", (rows, cols // 32))
                else:
                    out[f"{base}.weight"] = ("BF16", (rows, cols))
        return out

    estimates = {}
    for kind in ("float", "int4"):
        _header_only(tmp_path / kind, tensors(kind == "int4"))
        index = build_index(tmp_path / kind)
        sizes = model_sizes(index, config, 2)
        placement = plan(sizes, Budgets(None, 10**10), options(ctx=256))
        est = estimate_speed(placement, figures(cpu_read_bytes_s=1e9, cpu_layer_step_s=1e-6), "bfloat16", WARM)
        weights = index.total_bytes  # every tensor of these headers is already 16-bit or uint8
        assert est.read_bytes_per_token == weights + sizes.kv_bytes_per_token * 256
        estimates[kind] = est
    int4, bf16 = estimates["int4"], estimates["float"]
    saved = bf16.read_bytes_per_token - int4.read_bytes_per_token
    assert saved > 0.6 * sum(2 * rows * cols for rows, cols in shapes.values()) * 2  # the layers' matmuls shrank
    assert 1 / int4.decode_tok_s_low == pytest.approx(1 / bf16.decode_tok_s_low - saved / 1e9)  # same rates
