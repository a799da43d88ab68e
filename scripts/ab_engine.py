"""A/B of two source trees on the same engine workload, for changes whose effect is smaller than
this machine's run-to-run drift: run it alternately against each tree, several rounds, and compare
the pairs (docs/performance.md, issue 15's before/after).

    git worktree add /tmp/before <commit>
    for i in 1 2 3; do for t in /tmp/before $PWD; do PYTHONPATH=$t python scripts/ab_engine.py $t; done; done

Prints, for SmolLM2 in bf16: time to first token and decode tok/s of one 128-token prompt, and the
decode tok/s of 8 such prompts together (64 new tokens each, greedy), the median of 3 repetitions.
Only the Engine's generate() (both the old generator and today's Generation iterate the same way).
"""

import sys
import time

import torch

from llmrun.engine.build import EngineOptions
from llmrun.engine.sampler import SamplingParams
from llmrun.runtime import open_model

torch.set_num_threads(2)
engine = open_model("smollm2", EngineOptions(batch=8, dtype="bfloat16"), show_progress=False).engine
PROMPT = list(range(1000, 1128))


def case(batch: int, new_tokens: int = 64) -> tuple[float, float]:
    """(time to first token, decode tok/s after it) for `batch` distinct prompts."""
    prompts = [[token + i for token in PROMPT] for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    started, first, count = time.perf_counter(), None, 0
    for _ in engine.generate(prompts, params):
        count += 1
        if first is None:
            first = time.perf_counter()
    return first - started, (count - batch) / (time.perf_counter() - first)


case(1, 8)
case(8, 8)  # warm-up
rows = [(*case(1), case(8)[1]) for _ in range(3)]
ttft, one = sorted(rows, key=lambda row: row[1])[1][:2]
eight = sorted(row[2] for row in rows)[1]
print(f"{sys.argv[1] if len(sys.argv) > 1 else 'tree'} ttft1={ttft:.3f} dec1={one:.1f} dec8={eight:.1f}", flush=True)
