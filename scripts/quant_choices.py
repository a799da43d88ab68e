"""The measurements behind two choices of llmrun's quantizer (docs/performance.md, quality table):
the int4 least-squares fit against the plain min/max grid, and the embeddings (SmolLM2's tied head)
kept in 16 bits against compressed too. Prints one JSON line per variant.

Usage: LLMRUN_HOME=... python scripts/quant_choices.py [MODEL] (a float store model; default smollm2)
"""

from __future__ import annotations

import json
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
    print(json.dumps({"variant": name, "perplexity": round(score(folder), 4)}), flush=True)


def main() -> None:
    source = resolve_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2").path
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        quantize.FIT_ROUNDS = 0  # the plain min/max grid
        variant(source, work, "int4-g64-min-max", spec.QuantSpec(4, 64))
        quantize.FIT_ROUNDS = 4
        layer_rule = spec.quantizable
        quantize.quantizable = lambda name, shape: len(shape) == 2 and (layer_rule(name, shape)
                                                                         or "embed_tokens" in name)
        variant(source, work, "int4-g32-embeddings-too", spec.QuantSpec(4, 32))


if __name__ == "__main__":
    main()
