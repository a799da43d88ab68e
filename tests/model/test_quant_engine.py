"""A decoder over QuantWeights through the real engine (quantized on load): its layers run the device's
quantized matmul (kernels/choose.py), which agrees with the reference path (LLMRUN_NO_NATIVE=1:
every QuantWeight dequantized for its matmul) and gives a request the same tokens alone or batched."""

import os
from pathlib import Path

import pytest
import torch

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.quant.format import QuantWeight
from tests.checkpoints import llama_config, save_checkpoint
from tests.kernel_checks import c_kernels, quant_kernel_passes
from tests.parity import batched_and_alone, greedy_with_logits, same_tokens_but_for_ties

PROMPT = [(5 * i * i + 11 * i + 3) % 300 + 3 for i in range(23)]  # 23 tokens: a prompt chunk over 16 rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("quant") / "tiny", llama_config(), seed=21)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRUN_HOME", str(tmp_path / "home"))


def engine(tiny, dtype, quant, batch=1):
    return build_engine(tiny, EngineOptions(gpu_mem_bytes=0, dtype=dtype, quant=quant, batch=batch))


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_float32_decode_runs_the_kernel_and_keeps_the_references_tokens(tiny, home, monkeypatch, quant):
    """float32 rows keep float32 (the weight dequantized in registers): the reference's tokens, and
    logits within float32 rounding of it."""
    with engine(tiny, "float32", quant) as fast:
        assert isinstance(fast.weights.resident[0]["qkv"], QuantWeight)
        tokens, logits = greedy_with_logits(fast, PROMPT, 12)
        report = fast.decoder.kernels.describe()
    bits, group = (4, 32) if quant == "int4" else (8, 64)  # int8 on load: one scale per output channel
    assert report.get("quant_decode_kernel", False) is quant_kernel_passes(bits, group, 64, torch.float32)
    monkeypatch.setenv("LLMRUN_NO_NATIVE", "1")
    with engine(tiny, "float32", quant) as reference:
        expected_tokens, expected = greedy_with_logits(reference, PROMPT, 12)
    assert tokens == expected_tokens
    assert torch.allclose(logits, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_bf16_decode_runs_the_int8_activation_kernel_near_the_reference(tiny, home, monkeypatch):
    """bf16 rows are rounded to int8 per block of 32 for the VNNI kernel: the first step's logits stay
    close to the reference's (the same weights, dequantized, in bf16 matmuls)."""
    with engine(tiny, "bfloat16", "int4") as fast:
        _, logits = greedy_with_logits(fast, PROMPT[:9], 3)  # a prompt of 9 rows, then decode steps
        report = fast.decoder.kernels.describe()
    assert report.get("quant_decode_kernel", False) is quant_kernel_passes(in_features=64)
    monkeypatch.setenv("LLMRUN_NO_NATIVE", "1")
    with engine(tiny, "bfloat16", "int4") as reference:
        _, expected = greedy_with_logits(reference, PROMPT[:9], 3)
    similarity = torch.nn.functional.cosine_similarity(logits[0], expected[0], dim=0)
    assert similarity > 0.995


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_request_gets_its_tokens_alone_or_batched(tiny, home, dtype, quant, monkeypatch):
    """The quantized kernels compute each row alike whatever rows share the call (up to 16): nine
    requests decoded together (in steps of 9, 8, ... rows: the AMX tiles from their row counts where
    the CPU has them) get the tokens each gets alone. In bf16 the layer in one C call runs the
    several-row steps too (where it runs at all), each row's attention over its own keys."""
    import llmrun.kernels.quant_layer as quant_layer

    counts = []
    real = quant_layer.QuantLayer.run
    monkeypatch.setattr(quant_layer.QuantLayer, "run", lambda self, step, *a: counts.append(step.count)
                        or real(self, step, *a))
    prompts = [PROMPT[: 5 + 2 * i] for i in range(9)]
    with engine(tiny, dtype, quant, batch=9) as quantized:
        together, alone = batched_and_alone(quantized, prompts, 10)
        report = quantized.decoder.kernels.describe()
    assert together == alone
    if dtype == "bfloat16" and quant_layer_should_run():
        assert max(counts) == 9 and 1 in counts
        amx = quantized.decoder.kernels.quant.amx_int
        assert report["quant_decode_tiles"] == ("AMX int8" if amx else None)  # (9 rows: past both thresholds)


def quant_layer_should_run() -> bool:
    """Where a bf16 step runs its layers in one C call: the C set with its SiLU·mul, and the VNNI kernel."""
    kernels = c_kernels(torch.bfloat16)
    return kernels is not None and kernels.exp_fn is not None and quant_kernel_passes(4, 32, 64)


def test_bf16_layers_in_one_c_call_follow_the_op_by_op_path(tiny, home, monkeypatch):
    """The layer in one C call (kernels/quant_layer.py) against the same kernels op by op (its check
    failed on purpose): logits within the layer check's tolerance, and so the same tokens but where
    two lie within it of each other (a bf16 tie on this random model, which either may break)."""
    with engine(tiny, "bfloat16", "int4") as whole:
        tokens, logits = greedy_with_logits(whole, PROMPT, 12)
        assert whole.decoder.kernels.describe().get("quant_layer", False) is quant_layer_should_run()
    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", "quant_layer")
    with engine(tiny, "bfloat16", "int4") as op_by_op:
        expected_tokens, expected = greedy_with_logits(op_by_op, PROMPT, 12)
        assert "quant_layer" not in op_by_op.decoder.kernels.describe()
    tolerance = 0.05 * float(expected.abs().max())
    same = same_tokens_but_for_ties(tokens, logits, expected_tokens, expected, tolerance)
    assert float((logits[:same] - expected[:same]).abs().max()) <= tolerance


@pytest.mark.parametrize("reads", ["mapped", "copied"])
def test_streamed_layers_in_one_c_call_give_the_resident_runs_tokens(tiny, home, monkeypatch, reads):
    """A layer streamed from disk comes as views of its offload-cache file's mapping (or, with
    LLMRUN_NO_MAP=1, of a staging slot a reader thread fills), its scales and minimums staged as
    float32 (the offload cache's own copy), and its QuantWeights are put together once per piece (or
    slot), not every step (the layer's C structure is then kept for them too): the tokens and logits
    are the resident run's exactly."""
    from llmrun.weights.quantized import UnitParts
    from tests.placements import placement_options

    if reads == "copied":
        monkeypatch.setenv("LLMRUN_NO_MAP", "1")
    assembled = []
    real = UnitParts.assemble
    monkeypatch.setattr(UnitParts, "assemble", lambda self, tensors: assembled.append(1) or real(self, tensors))
    runs = []
    for placement in ("resident", "disk"):  # disk: at least half the layers streamed whole
        with build_engine(tiny, placement_options(placement, tiny, "bfloat16", quant="int4")) as e:
            assert (e.weights.streamer is not None) == (placement == "disk")
            assembled.clear()
            runs.append(greedy_with_logits(e, PROMPT, 12))
            assert e.decoder.kernels.describe().get("quant_layer", False) is quant_layer_should_run()
            if placement == "disk":
                weights, streamer = e.weights, e.weights.streamer
                streamed = [u for u in weights.unit_pieces if u != weights.head_unit]
                assert len(assembled) <= 2 * len(streamed) < 12 * len(streamed)  # once per slot, not per step
                assert (streamer.mapped is not None) == (reads == "mapped") == (streamer.disk is None)
                if reads == "mapped":  # (address, length) of each file's mapping
                    spans = [(torch.frombuffer(whole, dtype=torch.uint8).data_ptr(), len(whole))
                             for whole in streamer.mapped._maps.values()]
                else:  # each slot's bytes
                    spans = [(slot.flat.data_ptr(), slot.flat.numel()) for slot in streamer.disk.slots]
                for _, made in weights._assembled_views.values():
                    qw = made["gate_up"]
                    assert qw.scales.dtype == qw.mins.dtype == torch.float32
                    for t in (qw.qweight, qw.scales, qw.mins):
                        assert any(start <= t.data_ptr() < start + size for start, size in spans)
                layer_files = {p.name for p in (Path(os.environ["LLMRUN_HOME"]) / "offload").rglob("unit-*.bin")}
                assert {f"unit-{u}-f32-scales.bin" for u in streamed} <= layer_files
    assert runs[0][0] == runs[1][0]
    assert torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_steps_prompt_chunks_dequantize_each_weight_once(tiny, home, monkeypatch, dtype):
    """Two prompts prefilled in one step run their forwards in lockstep, layer by layer: each layer's
    compressed weights are dequantized once for both chunks (not once a chunk; never, where the VNNI
    GEMM multiplies bf16 chunks by the packed weight), and each prompt still gets the tokens it gets
    alone."""
    from llmrun.engine.sampler import SamplingParams
    from llmrun.kernels.quant_library import load_quant_library

    if load_quant_library() is None:
        pytest.skip("no C compiler here: prompt chunks run the reference, which dequantizes inside")
    prompts = [PROMPT, PROMPT[::-1] + PROMPT[:5]]  # 23 and 28 tokens: one chunk each, no shared prefix
    with build_engine(tiny, EngineOptions(gpu_mem_bytes=0, dtype=dtype, quant="int4", batch=4)) as e:
        quant, made = e.decoder.kernels.quant, []
        dequantized, amx_tiles = quant.dequantized, quant.amx_tiles  # (bf16 on an AMX CPU: the GEMM's tiles)
        monkeypatch.setattr(quant, "dequantized", lambda qw, dt: made.append(id(qw)) or dequantized(qw, dt))
        monkeypatch.setattr(quant, "amx_tiles", lambda qw: made.append(id(qw)) or amx_tiles(qw))
        generation = e.generate(prompts, SamplingParams(temperature=0, max_new_tokens=4))
        generation.run_to_end()
        together = [r.tokens for r in generation.results]
        packed = quant.vnni_gemm_ran and not quant.gemm_ran  # (the VNNI GEMM runs only bf16 chunks)
        assert packed is (dtype == "bfloat16" and quant.vnni_gemm_checked(4, 32, 64)
                          and not quant.gemm_checked(4, 32, 64))
        layers = e.decoder.config.num_hidden_layers
        assert len(made) == len(set(made)) == (0 if packed else 4 * layers)  # qkv, o, gate/up, down
        monkeypatch.setattr(quant, "dequantized", dequantized)
        monkeypatch.setattr(quant, "amx_tiles", amx_tiles)
        alone = []
        for prompt in prompts:
            e.allocator.reset_prefix_cache()
            one = e.generate([prompt], SamplingParams(temperature=0, max_new_tokens=4))
            one.run_to_end()
            alone.append(one.results[0].tokens)
    assert together == alone


def test_after_a_prefix_cache_hit_the_bf16_layer_reads_its_keys_through_the_block_table(tiny, home, monkeypatch):
    """A prefix-cache hit leaves the sequence's K/V rows apart in the pool: the layer in one C call
    still runs (its keys read row by row through the block table) and gives the tokens it gives
    the same request with the prefix computed again in contiguous rows."""
    if not quant_layer_should_run():
        pytest.skip("no bf16 quantized layer in one C call here (tests/test_simulated_cpus.py covers its absence)")
    import llmrun.kernels.quant_layer as quant_layer

    first, second = PROMPT + [7, 8, 9, 10, 11, 12, 13, 14, 15], PROMPT[:16] + [200, 201, 202, 203, 204]
    rows = []
    real = quant_layer.QuantLayer.run
    monkeypatch.setattr(quant_layer.QuantLayer, "run",
                        lambda self, step, *a: rows.append(any(r is not None for _, _, r in step.keys))
                        or real(self, step, *a))
    with engine(tiny, "bfloat16", "int4") as e:
        e.allocator.reset_prefix_cache()
        expected, _ = greedy_with_logits(e, second, 10)  # alone: contiguous rows
        assert not any(rows)
        e.allocator.reset_prefix_cache()
        greedy_with_logits(e, first, 3)
        tokens, _ = greedy_with_logits(e, second, 10)  # its first block from the cache
    assert any(rows), "no step read its keys through the block table"
    assert tokens == expected


def test_the_layer_check_refuses_a_layer_that_differs(tiny, home):
    """The check compares with the decoder's layer for real: against a reference whose MLP output is
    off by 20 % it fails, and the layer stays off for the engine's life."""
    if not quant_layer_should_run():
        pytest.skip("no bf16 quantized layer in one C call here (tests/test_simulated_cpus.py covers its absence)")
    with engine(tiny, "bfloat16", "int4") as e:
        layer = e.decoder.kernels.quant_layer
        real = e.decoder.layer_over(e.decoder.kernels)
        off = lambda *args: (lambda h, d: (h, d * 1.2))(*real(*args))  # noqa: E731
        meta_source = []
        e.decoder.kernels.whole_layer = lambda hidden, rope, meta, scale, reference: meta_source.append(
            (rope, meta, scale)) or None
        greedy_with_logits(e, PROMPT, 2)
        rope, meta, scale = meta_source[-1]
        with e.weights.layer(0) as w:
            assert layer.agrees(real, w, rope, meta, scale)
            layer.verified = None
            assert not layer.agrees(off, w, rope, meta, scale)


def test_the_row_check_leaves_out_only_matrices_the_c_kernels_compute_row_by_row(tiny, home, monkeypatch):
    """A compressed layer matrix needs no plain-matmul probe where the CPU's C kernel computes it (each
    row alone, tested above); a float model, or one whose kernel check fails (the reference
    dequantizes for a plain matmul, whose rows may depend on their company), keeps every probe."""
    from llmrun.kernels.row_check import LAYER_MATRICES, compressed_rows_alone, matmul_shapes

    with engine(tiny, "bfloat16", "none") as plain:
        assert compressed_rows_alone(plain.decoder, plain.weights) == frozenset()
    with engine(tiny, "bfloat16", "int4") as quantized:
        left_out = compressed_rows_alone(quantized.decoder, quantized.weights)
        assert left_out == (frozenset(LAYER_MATRICES) if quant_kernel_passes(in_features=64) else frozenset())
        config = quantized.decoder.config
        assert (config.vocab_size, config.hidden_size) in matmul_shapes(quantized.decoder, left_out)  # the head
    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", "quant")
    with engine(tiny, "bfloat16", "int4") as unchecked:
        assert compressed_rows_alone(unchecked.decoder, unchecked.weights) == frozenset()
