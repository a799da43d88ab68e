import pytest
import torch

from llmrun.engine.sampler import SamplingParams, filter_logits, make_generator, sample_next
from llmrun.errors import UsageError


def sample_many(logits, params, n=200):
    gen = make_generator(params, "cpu")
    return [sample_next(logits[None], [(params, gen, None)], "cpu")[0] for _ in range(n)]


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 0.0]])
    params = SamplingParams(temperature=0)
    assert sample_next(logits, [(params, None, None)] * 2, "cpu") == [1, 0]


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = torch.zeros(50)
    params = SamplingParams(temperature=1.0, top_k=None, top_p=None, min_p=None, seed=7)
    assert sample_many(logits, params) == sample_many(logits, params)
    other = SamplingParams(temperature=1.0, top_k=None, top_p=None, min_p=None, seed=8)
    assert sample_many(logits, params) != sample_many(logits, other)


def test_top_k_keeps_only_k_tokens():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    params = SamplingParams(temperature=1.0, top_k=2, top_p=None, min_p=None, seed=1)
    assert set(sample_many(logits, params)) <= {0, 1}
    kept = torch.isfinite(filter_logits(logits, params))
    assert kept.tolist() == [True, True, False, False, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    params = SamplingParams(temperature=1.0, top_k=None, top_p=0.7, min_p=None)
    kept = torch.isfinite(filter_logits(probs.log(), params))
    assert kept.tolist() == [True, True, False, False]


def test_min_p_drops_tokens_below_fraction_of_top():
    probs = torch.tensor([0.6, 0.3, 0.05, 0.05])
    params = SamplingParams(temperature=1.0, top_k=None, top_p=None, min_p=0.2)
    kept = torch.isfinite(filter_logits(probs.log(), params))
    assert kept.tolist() == [True, True, False, False]


def test_repetition_penalty_changes_greedy_choice():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    params = SamplingParams(temperature=0, repetition_penalty=1.5)
    seen = torch.tensor([True, False, False])
    assert sample_next(logits, [(params, None, seen)], "cpu") == [1]


def test_repetition_penalty_equals_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    from llmrun.engine.sampler import apply_repetition_penalty

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 300, generator=generator) * 4
    ids = torch.randint(0, 300, (1, 40), generator=generator)  # repeats included
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    seen = torch.zeros(300, dtype=torch.bool)
    seen[ids[0]] = True
    assert torch.equal(apply_repetition_penalty(logits[0], seen, 1.3), expected[0])


@pytest.mark.parametrize("temperature, penalty", [(1e-300, 1.0), (1e-40, 1.0), (1e-300, 1e-300), (0.7, 1e-300)])
def test_values_tiny_enough_to_overflow_sample_the_best_token_instead_of_failing(temperature, penalty):
    """1e-300 rounds to 0 in float32 (and a tiny penalty overflows a logit): softmax would give nan."""
    logits = torch.tensor([[1.5, 0.0, 3.0, -2.0, 2.9]])
    params = SamplingParams(temperature=temperature, repetition_penalty=penalty, seed=1)
    seen = torch.tensor([False, False, True, False, False])
    for _ in range(20):
        assert sample_next(logits, [(params, make_generator(params, "cpu"), seen)], "cpu") == [2]
    if temperature < 1e-30:
        assert torch.isfinite(filter_logits(logits[0], params)).tolist() == [False, False, True, False, False]


def test_rows_sample_with_their_own_settings_in_one_call():
    logits = torch.tensor([[0.0, 5.0, 0.0], [9.0, 1.0, 0.0], [0.0, 0.0, 30.0]])
    sampled = SamplingParams(temperature=1.0, top_k=None, top_p=None, min_p=None, seed=3)
    rows = [(SamplingParams(temperature=0), None, None),
            (SamplingParams(temperature=0, repetition_penalty=100.0), None, torch.tensor([True, False, False])),
            (sampled, make_generator(sampled, "cpu"), None)]
    assert sample_next(logits, rows, "cpu") == [1, 1, 2]


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 1.5), ("min_p", -0.1),
                                         ("repetition_penalty", 0), ("max_new_tokens", 0)])
def test_invalid_params_are_usage_errors(field, value):
    with pytest.raises(UsageError):
        SamplingParams(**{field: value})
