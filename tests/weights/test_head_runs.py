"""A resident head packed in runs of vocabulary rows (weights/placed.py's HEAD_PACK_ROWS): packing
holds a weight twice, so a large head is packed a run at a time. The logits and tokens are the whole
head's exactly, tied or not (a tied one's embedding rows are then read from the file)."""

import pytest
import torch

from llmrun.engine.build import EngineOptions, build_engine
from llmrun.weights import placed
from tests.checkpoints import llama_config, save_checkpoint
from tests.parity import greedy_with_logits

PROMPT = [5, 17, 42, 99, 3, 250, 7]


@pytest.mark.parametrize("tied", [False, True])
def test_a_head_packed_in_runs_gives_the_whole_heads_logits(tmp_path, monkeypatch, tied):
    folder = save_checkpoint(tmp_path / "tiny", llama_config(vocab_size=320, tie_word_embeddings=tied), seed=6)
    runs = {}
    for rows in (10**9, 96):  # 320 rows: three runs of 96 and one of 32
        monkeypatch.setattr(placed, "HEAD_PACK_ROWS", rows)
        with build_engine(folder, EngineOptions(dtype="bfloat16", gpu_mem_bytes=0)) as engine:
            head = engine.weights.resident[engine.weights.head_unit][placed.HEAD]
            chunks = list(engine.weights.head_chunks())
            if rows == 96:
                assert isinstance(head, tuple) and [c.shape[0] for c in chunks] == [96, 96, 96, 32]
            else:
                assert len(chunks) == 1 and chunks[0].shape[0] == 320
            runs[rows] = greedy_with_logits(engine, PROMPT, 8)
    assert runs[96][0] == runs[10**9][0]
    assert torch.equal(runs[96][1], runs[10**9][1])
