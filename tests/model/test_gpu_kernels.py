"""The Triton kernels of kernels/gpu_kernels.py, run by Triton's interpreter on CPU tensors (skipped
where triton is not installed; scripts/gpu_check.sh runs them compiled, on a GPU, in tests/gpu)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are defined
triton = pytest.importorskip("triton")

from llmrun.engine.build import EngineOptions, build_engine  # noqa: E402
from llmrun.kernels import choose  # noqa: E402
from llmrun.kernels.interface import LayerShape, within_ulps  # noqa: E402
from llmrun.kernels.gpu_kernels import TritonKernels  # noqa: E402
from tests.checkpoints import llama_config, phi3_config, save_checkpoint  # noqa: E402
from tests.model.test_llama_parity import prompt_ids  # noqa: E402
from tests.parity import greedy_with_logits  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PHI3_MINI_ISH = LayerShape(hidden_size=192, num_heads=2, num_kv_heads=2, head_dim=96, eps=1e-5,
                           intermediate_size=320)
TINY_GQA = LayerShape(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, eps=1e-6,
                      intermediate_size=128)


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


def triton_kernels_only(monkeypatch, fused: bool) -> None:
    """Engines built next get the Triton kernels (on the CPU too: the interpreter) or, unfused, ATen's ops."""
    monkeypatch.setattr(choose, "fused_kernels",
                        lambda shape, dtype, device, quant: TritonKernels.for_decoder(dtype, DEVICE, shape, quant)
                        if fused else None)


@pytest.mark.parametrize("static", (False, True), ids=("dynamic", "static-decode"))
@pytest.mark.parametrize("make_config", (llama_config, phi3_config), ids=("llama", "phi3"))
def test_decoder_with_the_kernels_keeps_its_tokens(tmp_path, make_config, static, monkeypatch):
    """The decoder over the Triton kernels: greedy tokens and logits
    of the ATen path, prompt and decode steps (static decode steps: with the decode attention)."""
    from llmrun.engine.graphs import StaticDecode

    folder = save_checkpoint(tmp_path, make_config(), seed=3)
    prompt = prompt_ids(5, 21)
    results = []
    for fused in (False, True):
        triton_kernels_only(monkeypatch, fused)
        engine = build_engine(folder, EngineOptions(dtype="float32", gpu_mem_bytes=0 if DEVICE.type == "cpu" else None))
        if static and DEVICE.type == "cpu":
            engine.runner.static = StaticDecode(engine.decoder, engine.runner.weights, engine.cache,
                                                engine.max_num_seqs, engine.max_context, capture=False)
        assert (engine.runner.static is not None) == static or DEVICE.type == "cuda"
        assert isinstance(engine.decoder.kernels, TritonKernels) == fused
        results.append(greedy_with_logits(engine, prompt, 8))
    assert results[0][0] == results[1][0]
    tolerance = 1e-5 if DEVICE.type == "cpu" else 1e-4  # CUDA: SDPA and the decode kernel sum in other orders
    torch.testing.assert_close(results[1][1], results[0][1], atol=tolerance, rtol=tolerance)


GEMV_DTYPES = (torch.float16,) + ((torch.bfloat16,) if DEVICE.type == "cuda" else ())


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
@pytest.mark.parametrize("shape", ((96, 192), (100, 96), (40, 2112), (7, 1024)),
                         ids=("small", "uneven", "K-past-a-block", "one-block"))
def test_gemv_matches_a_float32_matmul(dtype, shape):
    """One row times a weight, K in one block, K past one (2112 = 1024 + 1024 + 64: masked tail)."""
    n, k = shape
    generator = torch.Generator().manual_seed(n + k)
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(dtype).to(DEVICE)
    x = torch.randn(1, k, generator=generator).to(dtype).to(DEVICE)
    kernels = TritonKernels(dtype, DEVICE, TINY_GQA)
    ours = kernels.linear(x, weight)
    expected = torch.nn.functional.linear(x.float(), weight.float())
    assert ours.dtype == dtype and ours.shape == (1, n)
    torch.testing.assert_close(ours.float(), expected, atol=2e-3, rtol=1e-2)  # a rounding to 16 bits


@pytest.fixture
def gemv_launches(monkeypatch):
    """The GEMV's launches as they happen: (grid, fused norm, fused residual add)."""
    import llmrun.kernels.gpu_gemv as gpu_gemv

    launches = []
    real = gpu_gemv._gemv

    class Recording:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((grid, kwargs["NORM"], kwargs["RESIDUAL"]))
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(gpu_gemv, "_gemv", Recording())
    return launches


def test_gemv_runs_one_row_of_16_bits_and_leaves_the_rest_to_cublas(gemv_launches):
    launches = gemv_launches
    kernels = TritonKernels(torch.float16, DEVICE, TINY_GQA)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=generator).half().to(DEVICE)
    for x, w, bias in ((torch.randn(2, 32, generator=generator).half().to(DEVICE), weight, None),  # two rows
                       (torch.randn(1, 32, generator=generator).to(DEVICE), weight.float(), None),  # float32
                       (torch.randn(1, 32, generator=generator).half().to(DEVICE), weight, weight[:, 0]),  # a bias
                       (torch.randn(1, 64, generator=generator).half().to(DEVICE)[:, :32], weight, None)):
        assert torch.equal(kernels.linear(x, w, bias), torch.nn.functional.linear(x, w, bias))
    assert launches == [((64,), False, False)]  # the last: one row (a view), 16 bits, no bias
    assert kernels.describe() == {"set": "Triton", "silu_mul": False, "gemv": True}
    kernels.linear(torch.randn(1, 64, generator=generator).half().to(DEVICE), weight.t())  # a transposed weight
    assert len(launches) == 1


def test_fp16_decoder_with_the_gemv_keeps_its_tokens(tmp_path, gemv_launches, monkeypatch):
    """In float16 the decode steps' matmuls run the GEMV (its own order of summation): greedy
    tokens of the ATen path, logits within a 16-bit rounding or two."""
    monkeypatch.setenv("LLMRUN_NO_PACK", "1")  # on the CPU: plain weights, as on a GPU
    monkeypatch.setenv("LLMRUN_NO_CUDA_GRAPHS", "1")  # on a GPU: every step through Python, to count launches
    folder = save_checkpoint(tmp_path, llama_config(), seed=3)
    prompt = prompt_ids(5, 21)
    results = []
    for fused in (False, True):
        triton_kernels_only(monkeypatch, fused)
        engine = build_engine(folder, EngineOptions(dtype="float16", gpu_mem_bytes=0 if DEVICE.type == "cpu" else None))
        assert isinstance(engine.decoder.kernels, TritonKernels) == fused
        results.append(greedy_with_logits(engine, prompt, 8))
        assert bool(gemv_launches) == fused
    # the prompt's head (its last row), then 7 decode steps: in each of 3 layers qkv and gate/up
    # with their norms, o and down with their residual adds; then the head
    assert len(gemv_launches) == 1 + 7 * (3 * 4 + 1)
    assert sum(norm for _, norm, _ in gemv_launches) == sum(add for _, _, add in gemv_launches) == 7 * 3 * 2
    assert results[0][0] == results[1][0]
    torch.testing.assert_close(results[1][1], results[0][1], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", GEMV_DTYPES)
def test_gemv_with_its_norm_and_its_residual_add(dtype, gemv_launches):
    """The fused prologue and epilogue against the kernels they replace: the norm within a 16-bit
    rounding of _add_rms_norm's (each GEMV program sums the squares in its own order), the add exact."""
    generator = torch.Generator().manual_seed(9)
    k, n = 2112, 96  # K past one block: the squares summed over chunks
    shape = LayerShape(k, 4, 2, 16, 1e-5)
    kernels = TritonKernels(dtype, DEVICE, shape)
    hidden = torch.randn(1, k, generator=generator).to(dtype).to(DEVICE)
    norm_weight = (1 + torch.randn(k, generator=generator) * 0.2).to(dtype).to(DEVICE)
    weight = (torch.randn(n, k, generator=generator) / k**0.5).to(dtype).to(DEVICE)
    same, fused = kernels.norm_linear(hidden, None, norm_weight, weight)
    assert same is hidden and gemv_launches[-1][1:] == (True, False)
    separate = kernels.linear(kernels.add_rms_norm(hidden, None, norm_weight)[1], weight)
    torch.testing.assert_close(fused.float(), separate.float(), atol=2e-3, rtol=1e-2)

    x = torch.randn(1, k, generator=generator).to(dtype).to(DEVICE)
    residual = torch.randn(1, n, generator=generator).to(dtype).to(DEVICE)
    summed, pending = kernels.linear_residual(x, weight, None, residual)
    assert pending is None and gemv_launches[-1][1:] == (False, True)
    assert torch.equal(summed, residual + kernels.linear(x, weight))  # the product rounded, then added
    two_rows = torch.randn(2, k, generator=generator).to(dtype).to(DEVICE)
    kept, product = kernels.linear_residual(two_rows, weight, None, residual.expand(2, n))
    assert product is not None and torch.equal(product, torch.nn.functional.linear(two_rows, weight))
