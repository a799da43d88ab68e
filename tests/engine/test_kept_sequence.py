"""A kept sequence (a conversation) reuses its cached prefix and still equals a fresh run."""

import pytest

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.batcher import common_prefix_len
from llmrun.engine.prompt import chat_prompt_ids
from llmrun.engine.sampler import SamplingParams
from tests.checkpoints import llama_config, save_checkpoint

TURNS = ["Hello, how are you today?", "The capital of France is Paris.", "def main():",
         "Numbers: 1 2 3", "a b c d e f g"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    folder = save_checkpoint(tmp_path_factory.mktemp("kept") / "tiny", llama_config(), seed=2)
    options = EngineOptions(dtype="float32", gpu_mem_bytes=0)
    return build_engine(folder, options), build_engine(folder, options)


def test_each_turn_prefills_only_what_is_new_and_matches_a_fresh_run(engines):
    chat, fresh = engines
    params = SamplingParams(temperature=0, max_new_tokens=8)
    kept = chat.keep_sequence()
    messages, previous = [], []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        ids = chat_prompt_ids(chat.tokenizer, messages)
        reusable = common_prefix_len(kept.cached_ids, ids)
        result = chat.generate([ids], params, kept=[kept]).run_to_end()[0]
        assert result.prefilled_tokens == len(ids) - reusable
        if previous:
            assert reusable >= len(previous)  # the whole earlier prompt came from the cache
        assert result.tokens == fresh.generate([ids], params).run_to_end()[0].tokens
        assert kept.cached_ids == (ids + result.tokens)[: len(kept.cached_ids)]
        messages.append({"role": "assistant", "content": result.text})
        previous = ids
    held = len(chat.allocator.block_table(kept.seq_id))
    assert held == chat.allocator.blocks_needed(len(kept.cached_ids))
    chat.release(kept)
    assert chat.allocator.num_free_blocks == chat.allocator.num_blocks


def test_an_edited_history_falls_back_to_the_common_prefix(engines):
    chat, fresh = engines
    params = SamplingParams(temperature=0, max_new_tokens=6)
    kept = chat.keep_sequence()
    first = chat_prompt_ids(chat.tokenizer, [{"role": "user", "content": TURNS[0]}])
    list(chat.generate([first], params, kept=[kept]))
    edited = chat_prompt_ids(chat.tokenizer, [{"role": "user", "content": TURNS[1]}])
    [continued] = chat.generate([edited], params, kept=[kept]).run_to_end()
    [alone] = fresh.generate([edited], params).run_to_end()
    assert continued.tokens == alone.tokens
    assert continued.prefilled_tokens == len(edited) - common_prefix_len(first, edited)
    chat.release(kept)
