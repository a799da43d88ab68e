"""A request's bits do not depend on its company: the same logits and tokens alone as batched."""

import pytest
import torch
import torch.nn.functional as F

import llmrun.engine.runner as runner_module
import llmrun.kernels.row_check as row_check
from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.prompt import prompt_ids
from llmrun.engine.sampler import SamplingParams
from tests.checkpoints import llama_config, save_checkpoint

SMOLLM2_TEXTS = ["one", "two", "The capital of France is", "def fib(n):", "Why is the sky blue?",
                 "Write a long poem about the sea and the wind, please, in four verses.", "hi",
                 "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"]


def generate_with_logits(engine, prompts, steps):
    """Greedy tokens and each step's logits (a list of [vocab] rows) per prompt, decoded together."""
    engine.eos_ids = frozenset()  # compare every step even if a model emits EOS
    engine.allocator.reset_prefix_cache()  # company alone: a prefix-cache hit changes the chunks (tests/engine/test_loop.py)
    logits = [[] for _ in prompts]

    def keep(indices, rows):
        for index, row in zip(indices, rows):
            logits[index].append(row.float().clone())

    params = SamplingParams(temperature=0, max_new_tokens=steps)
    results = engine.generate(prompts, params, on_logits=keep).run_to_end()
    return [r.tokens for r in results], [torch.stack(rows) for rows in logits]


def assert_alone_equals_batched(engine, prompts, steps, batches):
    alone = [generate_with_logits(engine, [prompt], steps) for prompt in prompts]
    for batch in batches:
        for first in range(0, len(prompts), batch):
            tokens, logits = generate_with_logits(engine, prompts[first : first + batch], steps)
            for offset, (got_tokens, got_logits) in enumerate(zip(tokens, logits)):
                (want_tokens,), (want_logits,) = alone[first + offset]
                assert got_tokens == want_tokens, f"prompt {first + offset} in a batch of {batch}"
                assert torch.equal(got_logits, want_logits), f"prompt {first + offset} in a batch of {batch}"


@pytest.mark.slow
def test_smollm2_bf16_alone_equals_batched_2_3_8(smollm2_dir):
    engine = build_engine(smollm2_dir, EngineOptions(dtype="bfloat16", gpu_mem_bytes=0, ctx=512, batch=8))
    prompts = [prompt_ids(engine.tokenizer, text) for text in SMOLLM2_TEXTS]
    assert len({len(p) for p in prompts}) >= 5  # prompts of different lengths
    assert_alone_equals_batched(engine, prompts, 8, (2, 3, 8))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config = llama_config(hidden_size=128, intermediate_size=352, num_attention_heads=4, num_key_value_heads=2)
    return save_checkpoint(tmp_path_factory.mktemp("invariance") / "tiny", config, seed=12)


def tiny_prompts(count):
    generator = torch.Generator().manual_seed(5)
    lengths = [3, 70, 9, 33, 40, 2, 20, 64, 5, 31, 17, 48, 12, 7, 90, 26, 11]
    return [torch.randint(3, 300, (lengths[i % len(lengths)],), generator=generator).tolist() for i in range(count)]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tiny_alone_equals_batched_over_many_rows_and_chunks(tiny, dtype):
    """Up to 17 rows (past one forward's 16), prompts either side of 32 rows and of a prefill
    chunk: 64 tokens a step, so the 70- and 90-token prompts run in chunks."""
    engine = build_engine(tiny, EngineOptions(dtype=dtype, gpu_mem_bytes=0, ctx=256, batch=17))
    engine.max_prefill_tokens = 64
    assert_alone_equals_batched(engine, tiny_prompts(17), 6, (2, 5, 17))


def test_decode_rows_follow_the_row_check(tiny, monkeypatch):
    """Where the row check fails (as it may on another CPU or library), decode rows run one forward
    each and still give the bits they get alone; where it passes they share one forward."""
    engine = build_engine(tiny, EngineOptions(dtype="bfloat16", gpu_mem_bytes=0, ctx=256, batch=5))
    prompts = tiny_prompts(5)
    alone = [generate_with_logits(engine, [prompt], 4) for prompt in prompts]
    lockstep = engine.runner._forward_lockstep
    for passes in (False, True):
        monkeypatch.setattr(runner_module, "rows_alone", lambda decoder, num_rows, compressed: passes)
        engine.runner._rows_checked.clear()
        forwards = []
        monkeypatch.setattr(engine.runner, "_forward_lockstep",
                            lambda groups: forwards.extend(len(g) for g in groups) or lockstep(groups))
        tokens, logits = generate_with_logits(engine, prompts, 4)
        assert tokens == [a[0][0] for a in alone]
        assert all(torch.equal(got, a[1][0]) for got, a in zip(logits, alone))
        decode_rows = [rows for rows in forwards if rows > 1]
        assert (decode_rows == [5, 5, 5]) if passes else (decode_rows == [])


def test_the_row_check_sees_a_matmul_whose_rows_depend_on_their_company(tiny, monkeypatch):
    engine = build_engine(tiny, EngineOptions(dtype="float32", gpu_mem_bytes=0, ctx=256, batch=4))
    def exact(x, weight, bias=None):  # each row by itself: no company to depend on
        return torch.cat([F.linear(row.double(), weight.double()).to(x.dtype) for row in x.split(1)])

    monkeypatch.setattr(row_check, "linear", exact)
    assert row_check.rows_alone(engine.decoder, 4)

    def by_count(x, weight, bias=None):  # a kernel chosen by the number of rows, summing in another order
        return exact(x, weight) if x.shape[0] == 1 else F.linear(x.half().float(), weight).to(x.dtype)

    monkeypatch.setattr(row_check, "linear", by_count)
    assert not row_check.rows_alone(engine.decoder, 4)


def test_what_the_row_check_passes_holds_on_the_real_weights(tiny):
    """The check runs on probe weights; where it passes, the model's own matmuls agree too."""
    from llmrun.model.layers import linear

    for dtype in ("bfloat16", "float32"):
        engine = build_engine(tiny, EngineOptions(dtype=dtype, gpu_mem_bytes=0, ctx=256, batch=16))
        with engine.runner.weights.layer(0) as w:
            matrices = [w["qkv"], w["o"], w["gate_up"], w["down"]]
        for num_rows in (2, 7, 16):
            if not row_check.rows_alone(engine.decoder, num_rows):
                continue
            for weight in matrices:
                x = torch.randn(num_rows, weight.shape[1], generator=torch.Generator().manual_seed(num_rows))
                x = x.to(engine.decoder.dtype)
                alone = torch.cat([linear(x[row : row + 1], weight) for row in range(num_rows)])
                assert torch.equal(linear(x, weight), alone), (dtype, num_rows, tuple(weight.shape))


@pytest.mark.parametrize("placement", ["disk", "disk-floor"])
def test_a_steps_forwards_in_lockstep_over_streamed_layers(tiny, placement):
    """Prompts prefilled in one step run their forwards layer by layer together: over layers
    streamed whole (each read once a step), and at the floor, where a layer streams matrix by
    matrix and each matrix can be read once (there the forwards run one after another): each prompt
    gets its tokens alone."""
    from tests.parity import batched_and_alone
    from tests.placements import placement_options

    options = placement_options(placement, tiny, "float32", ctx=256, batch=4)
    with build_engine(tiny, options) as engine:
        assert engine.weights.streamer is not None
        assert engine.weights.stages_matrices == (placement == "disk-floor")
        together, alone = batched_and_alone(engine, tiny_prompts(3), 4)
    assert together == alone
