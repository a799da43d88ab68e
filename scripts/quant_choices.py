"""The measurements behind the choices of llmrun's quantizer (docs/performance.md, quality table): the
int4 least-squares fit against the plain min/max grid, and the output head (SmolLM2's is the tied
embedding table) in int8 groups of 32 against 16 bits, int8 with one scale per row, and int4. Prints
one JSON line per variant: its perplexity and its greedy reply to the README's question.

Usage: LLMRUN_HOME=... python scripts/quant_choices.py [MODEL] (a float store model; default smollm2)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from llmrun.bench.perplexity import perplexity
from llmrun.engine.build import EngineOptions, build_engine
from llmrun.engine.tokenizer import load_tokenizer
from llmrun.hub.resolve import resolve_model
from llmrun.plan.inputs import folder_inputs
from llmrun.quant import quantize, spec
from llmrun.quant.quantize import quantize_index

TEXT = Path(__file__).resolve().parents[1] / "data" / "perplexity-english.txt"
QUESTION = "What is the capital of France? Answer in one sentence."


def score(folder: Path) -> float:
    engine = build_engine(folder, EngineOptions(gpu_mem_bytes=0, dtype="bfloat16"))
    with engine:
        return perplexity(engine, load_tokenizer(folder).encode(TEXT.read_text(), add_special_tokens=False)).perplexity


def variant(source: Path, work: Path, name: str, quant_spec: spec.QuantSpec) -> None:
    folder = work / name
    folder.mkdir()
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name != "llmrun.json":
            (folder / file.name).write_bytes(file.read_bytes())
    quantize_index(folder_inputs(source).index, quant_spec, folder / "model.safetensors", keep_floats=True)
    reply = subprocess.run([sys.executable, "-m", "llmrun", "run", str(folder), QUESTION, "-t", "0", "-n", "16",
                            "--gpu-mem", "0", "--dtype", "bfloat16"], capture_output=True, text=True).stdout.strip()
    print(json.dumps({"variant": name, "perplexity": round(score(folder), 4), "reply": reply}), flush=True)


def main() -> None:
    source = resolve_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2").path
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        variant(source, work, "int4-g32", spec.QuantSpec(4, 32))  # as llmrun quantizes
        quantize.FIT_ROUNDS = 0  # the plain min/max grid
        variant(source, work, "int4-g64-min-max", spec.QuantSpec(4, 64))
        quantize.FIT_ROUNDS = 4
        variant(source, work, "int4-g64", spec.QuantSpec(4, 64))
        chosen = spec.HEAD_SPEC
        for head, label in ((None, "16-bit"), (spec.QuantSpec(8, spec.PER_CHANNEL), "int8-per-row"),
                            (spec.QuantSpec(4, 32), "int4-g32")):
            spec.HEAD_SPEC = head
            variant(source, work, f"int4-g32-head-{label}", spec.QuantSpec(4, 32))
        spec.HEAD_SPEC = chosen


if __name__ == "__main__":
    main()
