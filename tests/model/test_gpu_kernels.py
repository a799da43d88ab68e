"""The Triton kernels of model/gpu_kernels.py, run by Triton's interpreter on CPU tensors (skipped
where triton is not installed; scripts/gpu_check.sh runs them compiled, on a GPU, in tests/gpu)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined
triton = pytest.importorskip("triton")

from llmrun.engine.build import EngineOptions, build_engine  # noqa: E402
from llmrun.model.fused import LayerShape, within_ulps  # noqa: E402
from llmrun.model.gpu_kernels import TritonKernels  # noqa: E402
from tests.checkpoints import llama_config, phi3_config, save_checkpoint  # noqa: E402
from tests.model.test_llama_parity import prompt_ids  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PHI3_MINI_ISH = LayerShape(hidden_size=192, num_heads=2, num_kv_heads=2, head_dim=96, eps=1e-5,
                           intermediate_size=320, silu=True)
TINY_GQA = LayerShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, eps=1e-6,
                      intermediate_size=128, silu=True)


# The interpreter rounds to bfloat16 its own way (numpy has no bfloat16): that dtype on a GPU only.
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE.type == "cuda" else ())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", (PHI3_MINI_ISH, TINY_GQA), ids=("head-dim-96", "gqa"))
def test_kernels_pass_their_check(shape, dtype):
    kernels = TritonKernels(dtype, DEVICE, shape)
    assert kernels.check()
    # SiLU·mul is exact with CUDA's expf; the interpreter's numpy exp is not Sleef's, ATen's CPU exp
    assert kernels._silu_mul_matches() or DEVICE.type == "cpu"


def test_the_check_fails_a_kernel_that_differs(monkeypatch):
    """The check compares with ATen for real: a RoPE that skips the rotation is refused."""
    kernels = TritonKernels(torch.float16, DEVICE, TINY_GQA)
    monkeypatch.setattr(kernels, "rope_qkv", lambda qkv, cos, *rest: qkv[:, :64].reshape(-1, 4, 16).clone())
    assert not kernels.check()


def test_within_ulps():
    x = torch.tensor([1.0, -3.0, 1e-3, 0.0, 60000.0], dtype=torch.float16)
    up = torch.full_like(x, float("inf"))
    once = torch.nextafter(x, up)
    assert within_ulps(once, x, 1) and not within_ulps(torch.nextafter(once, up), x, 1)
    assert within_ulps(torch.nextafter(once, up), x, 2)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("window", (None, 40))
@pytest.mark.parametrize("table_blocks", (4, 40), ids=("one-part", "ten-parts"))
def test_decode_attention_matches_sdpa(dtype, window, table_blocks):
    """Rows of 1 to 600 keys over block tables of 4 blocks (64 keys: one part) or 40 (640 keys:
    ten parts of 64, joined), blocks scattered over the pool, GQA, and a sliding window: the
    kernel against ATen's SDPA over the gathered keys."""
    from llmrun.kv.metadata import static_decode_metadata, windowed
    from llmrun.model.attention import paged_attention

    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, dim, block = 4, 2, 16, 16
    lens = [1, 37, 64 if table_blocks == 4 else 600]
    num_blocks = 48
    tables = torch.stack([torch.randperm(num_blocks, generator=generator)[:table_blocks] for _ in lens])
    k_pool, v_pool = (torch.randn(num_blocks * block, kv_heads, dim, generator=generator).to(dtype).to(DEVICE)
                      for _ in range(2))
    q = torch.randn(3, heads, dim, generator=generator).to(dtype).to(DEVICE)
    meta = static_decode_metadata(tables.to(DEVICE), torch.tensor(lens, device=DEVICE),
                                  torch.zeros(3, dtype=torch.long, device=DEVICE), block, lens)
    if window is not None:
        meta = windowed(meta, window)
    kernels = TritonKernels(dtype, DEVICE, LayerShape(heads * dim, heads, kv_heads, dim, 1e-6))
    assert kernels.can_attend(meta, None) and not kernels.can_attend(meta, 30.0)
    ours = kernels.attend(q, k_pool, v_pool, meta, dim**-0.5)
    expected = paged_attention(q.float(), k_pool.float(), v_pool.float(), meta, dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(ours.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("static", (False, True), ids=("dynamic", "static-decode"))
@pytest.mark.parametrize("make_config", (llama_config, phi3_config), ids=("llama", "phi3"))
def test_decoder_with_the_kernels_keeps_its_tokens(tmp_path, make_config, static):
    """The decoder's fused path (forward_native) over the Triton kernels: greedy tokens and logits
    of the ATen path, prompt and decode steps (static decode steps: with the decode attention)."""
    from llmrun.engine.graphs import StaticDecode

    folder = save_checkpoint(tmp_path, make_config(), seed=3)
    prompt = prompt_ids(5, 21)
    results = []
    for fused in (False, True):
        engine = build_engine(folder, EngineOptions(dtype="float32", gpu_mem_bytes=0 if DEVICE.type == "cpu" else None))
        if static and DEVICE.type == "cpu":
            engine.runner.static = StaticDecode(engine.decoder, engine.runner.weights, engine.cache,
                                                engine.max_num_seqs, engine.max_context, capture=False)
        assert (engine.runner.static is not None) == static or DEVICE.type == "cuda"
        decoder = engine.decoder
        shape = LayerShape(decoder.config.hidden_size, decoder.config.num_attention_heads,
                           decoder.config.num_key_value_heads, decoder.config.head_dim, decoder.config.rms_norm_eps,
                           decoder.config.intermediate_size, silu=True)
        decoder.native = TritonKernels.for_decoder(torch.float32, DEVICE, shape) if fused else None
        assert (decoder.native is not None) == fused
        engine.eos_ids = frozenset()
        logits = []
        from llmrun.engine.sampler import SamplingParams

        list(engine.generate([prompt], SamplingParams(temperature=0, max_new_tokens=8),
                             on_logits=lambda idx, rows: logits.append(rows[0].float().cpu())))
        results.append((engine.results[0].tokens, torch.stack(logits)))
    assert results[0][0] == results[1][0]
    tolerance = 1e-5 if DEVICE.type == "cpu" else 1e-4  # CUDA: SDPA and the decode kernel sum in other orders
    torch.testing.assert_close(results[1][1], results[0][1], atol=tolerance, rtol=tolerance)
