"""CUDA paths (run by scripts/gpu_check.sh on an NVIDIA machine; skipped elsewhere)."""

import pytest
import torch

from llmrun.engine.build import build_engine
from llmrun.plan.tiers import Tier
from tests.checkpoints import llama_config, phi3_config, save_checkpoint
from tests.parity import batched_and_alone, greedy_with_logits
from tests.placements import placement_options

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CONFIGS = {"llama": llama_config, "phi3": phi3_config}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp(request.param), CONFIGS[request.param](), seed=9)


def reference_cuda(folder, prompt, steps):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda()
    out = model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=steps, do_sample=False,
                         min_new_tokens=steps, pad_token_id=0)
    with torch.no_grad():
        logits = model(out).logits[0, len(prompt) - 1 : -1].cpu()
    return out[0, len(prompt):].tolist(), logits


@pytest.mark.parametrize("placement", ("gpu", "gpu-cpu", "gpu-disk"))
def test_cuda_placements_match_transformers(checkpoint, placement):
    prompt = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_tokens, ref_logits = reference_cuda(checkpoint, prompt, 16)
    engine = build_engine(checkpoint, placement_options(placement, checkpoint))
    tiers = engine.plan.placement.layer_tiers
    assert engine.plan.placement.compute_tier is Tier.GPU
    expected = {"gpu": Tier.GPU, "gpu-cpu": Tier.CPU, "gpu-disk": Tier.DISK}[placement]
    assert expected in tiers
    tokens, logits = greedy_with_logits(engine, prompt, 16)
    assert tokens == ref_tokens
    torch.testing.assert_close(logits, ref_logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("placement", ("gpu", "gpu-cpu"))
def test_cuda_batched_matches_alone(checkpoint, placement):
    prompts = [torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 29, 11)]
    engine = build_engine(checkpoint, placement_options(placement, checkpoint, batch=3))
    together, alone = batched_and_alone(engine, prompts, 10)
    assert together == alone


def test_cuda_graph_decode_matches_eager(checkpoint, monkeypatch):
    """Decode steps replayed from CUDA graphs (engine/graphs.py) give the eager path's tokens and
    logits; 40 steps after a 12-token prompt cross three buckets (1, 2, 4 blocks of 16 tokens)."""
    prompt = torch.randint(3, 320, (12,), generator=torch.Generator().manual_seed(4)).tolist()
    engine = build_engine(checkpoint, placement_options("gpu", checkpoint))
    assert engine.runner.static is not None
    tokens, logits = greedy_with_logits(engine, prompt, 40)
    graphs = engine.runner.static.graphs
    assert len(graphs) == 3 and all(graph is not None for graph, _ in graphs.values()), graphs
    monkeypatch.setenv("LLMRUN_NO_CUDA_GRAPHS", "1")
    eager = build_engine(checkpoint, placement_options("gpu", checkpoint))
    assert not eager.runner.static.capture
    eager_tokens, eager_logits = greedy_with_logits(eager, prompt, 40)
    assert all(graph is None for graph, _ in eager.runner.static.graphs.values())
    assert tokens == eager_tokens
    torch.testing.assert_close(logits, eager_logits, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("placement", ("gpu-cpu", "gpu-disk"))
def test_fp16_streamed_decode_gives_the_resident_tokens(checkpoint, placement):
    """In float16, where kernels that sum in another order soon change a greedy token, streamed
    layers (eager decode steps) and resident ones (replayed graphs) run the same kernels."""
    prompt = torch.randint(3, 320, (12,), generator=torch.Generator().manual_seed(6)).tolist()
    resident = build_engine(checkpoint, placement_options("gpu", checkpoint, dtype="float16"))
    streamed = build_engine(checkpoint, placement_options(placement, checkpoint, dtype="float16"))
    assert resident.runner.static.capture and not streamed.runner.static.capture
    resident_tokens, resident_logits = greedy_with_logits(resident, prompt, 48)
    streamed_tokens, streamed_logits = greedy_with_logits(streamed, prompt, 48)
    assert streamed_tokens == resident_tokens
    assert torch.equal(streamed_logits, resident_logits)


def test_cuda_decoders_use_the_triton_kernels(checkpoint):
    from llmrun.kernels.gpu_kernels import TritonKernels

    engine = build_engine(checkpoint, placement_options("gpu", checkpoint))
    assert isinstance(engine.decoder.kernels, TritonKernels) and engine.decoder.kernels.can_silu_mul(1)


def test_cuda_graphs_stay_off_when_layers_stream(checkpoint):
    engine = build_engine(checkpoint, placement_options("gpu-cpu", checkpoint))
    assert engine.runner.static is not None and not engine.runner.static.capture


@pytest.mark.parametrize("placement", ("gpu", "gpu-disk"))
def test_calibration_on_cuda_measures_what_the_cpu_measures(checkpoint, placement):
    """`quantize --calibrate`'s float pass on a CUDA engine (resident, or layers streamed from disk)
    records the importances the CPU's does."""
    from llmrun.quant.calibrate import calibrate
    from llmrun.quant.spec import QuantSpec, compressed, in_layer
    from llmrun.weights.index import build_index

    names = [n for n in compressed(build_index(checkpoint), QuantSpec(4, 32)) if in_layer(n)]
    text = " ".join(f"a boat and {n} gulls crossed the bay" for n in range(60))
    runs = [calibrate(checkpoint, text, "t", names, options=placement_options(name, checkpoint, ctx=128, batch=1))
            for name in ("resident", placement)]
    assert runs[0].num_tokens > 128  # more than one window
    for name in names:
        torch.testing.assert_close(runs[1].importance[name], runs[0].importance[name], rtol=1e-3, atol=1e-6)
