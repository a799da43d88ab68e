"""The real SmolLM2-135M-Instruct Q4_1 GGUF imported with its quantization kept: its size on disk,
and teacher-forced next-token agreement with transformers loading the same GGUF (it dequantizes)."""

import shutil
from pathlib import Path

import pytest
import torch

from tests.cli.helpers import run_cli

pytestmark = pytest.mark.slow
TEXT = Path(__file__).resolve().parents[1] / "data" / "perplexity-english.txt"
MAX_TOKENS = 2048


@pytest.fixture(scope="module")
def kept_entry(smollm2_gguf, tmp_path_factory):
    """`llmrun import` of the real GGUF (quantization kept by default): (the store folder, stderr)."""
    home = tmp_path_factory.mktemp("kept-home")
    proc = run_cli(["import", str(smollm2_gguf), "--name", "smollm2-q4_1"], home)
    assert proc.returncode == 0, proc.stderr
    return home / "llmrun-home" / "models" / "smollm2-q4_1", proc.stderr


def test_the_kept_import_keeps_every_q4_1_tensor_within_1_15x_the_gguf(kept_entry, smollm2_gguf):
    from llmrun.hub.store import read_metadata

    folder, notes = kept_entry
    entry_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    ratio = entry_bytes / smollm2_gguf.stat().st_size
    print(f"kept import {entry_bytes} bytes = {ratio:.3f} x the GGUF's {smollm2_gguf.stat().st_size}")
    assert ratio <= 1.15
    summary = read_metadata(folder).quant
    assert summary["dequantized"] == {}, notes
    assert summary["kept"].get("Q4_1", 0) >= 7 * 30  # every layer's seven matmuls


def reference_float_folder(kept: Path, target: Path) -> Path:
    """The kept import with every quantized weight replaced by the reference dequantize (float32)."""
    from safetensors.torch import save_file

    from llmrun.quant.format import dequantize
    from llmrun.quant.stored import load_quantized

    target.mkdir()
    for item in kept.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, target / item.name)
    loaded = load_quantized(kept / "model.safetensors")
    tensors = {name: value.to(torch.float32) for name, value in loaded.floats.items()}
    tensors.update({name: dequantize(qw) for name, qw in loaded.quantized.items()})
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


@torch.inference_mode()
def teacher_forced_top_tokens(engine, ids: list[int]) -> torch.Tensor:
    """llmrun's top next token at every position of `ids`, prompt chunks through its own decoder."""
    from llmrun.bench.perplexity import window_forwards

    return torch.cat([engine.decoder.logits(engine.weights, hidden).argmax(-1)
                      for _, hidden in window_forwards(engine, ids)])


def transformers_top_tokens(gguf_file: Path, text: str) -> tuple[list[int], torch.Tensor]:
    """transformers loading the GGUF itself (dequantized, float32): the text's ids and each top token."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as empty:
        tokenizer = AutoTokenizer.from_pretrained(empty, gguf_file=str(gguf_file))
        model = AutoModelForCausalLM.from_pretrained(empty, gguf_file=str(gguf_file), dtype=torch.float32)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
    with torch.inference_mode():
        return ids, model(torch.tensor([ids])).logits[0].argmax(-1)


@pytest.mark.parametrize("path", ["reference dequantize", "as stored"])
def test_teacher_forced_agreement_with_transformers_on_the_same_gguf(kept_entry, smollm2_gguf, tmp_path, path):
    """llmrun on the kept weights, through the reference dequantize (float32) or as stored (the
    quantized kernels, float32 rows), against transformers on the GGUF: >= 99 % of positions."""
    from llmrun.engine.build import EngineOptions
    from llmrun.runtime import open_model

    ids, expected = transformers_top_tokens(smollm2_gguf, TEXT.read_text(encoding="utf-8"))
    assert len(ids) >= 2000
    if path == "as stored":
        folder, options = kept_entry[0], EngineOptions(dtype="float32", ctx=MAX_TOKENS)
    else:
        folder = reference_float_folder(kept_entry[0], tmp_path / "reference")
        options = EngineOptions(dtype="float32", ctx=MAX_TOKENS)
    with open_model(str(folder), options, show_progress=False).engine as engine:
        assert bool(engine.weights.quant) == (path == "as stored")
        ours = teacher_forced_top_tokens(engine, ids)
    agreement = (ours == expected).float().mean().item()
    print(f"{path}: teacher-forced top-token agreement over {len(ids)} positions: {agreement:.4f}")
    assert agreement >= 0.99


def test_in_bf16_the_kept_weights_choose_what_their_float_values_choose(kept_entry, tmp_path, monkeypatch):
    """bf16 arithmetic alone moves the top token at a few % of positions, so the issue's 99 % is met in
    float32 above; in bf16 the kept weights, run through the quantized path with bf16 activations,
    must agree with the same weights dequantized to a float model (run in bf16) at least as well as
    transformers' own bf16 agrees with its float32 on that float model: the arithmetic's noise,
    measured here (96.9 % where measured; llmrun 100 % on a host without AMX, where both sides run
    oneDNN alike, 97.75 % on an AMX host, whose AMX GEMM and oneDNN sum in other orders). The VNNI
    prompt GEMM, which rounds the activations to int8 as decode steps do (95.8 %: docs/performance.md),
    is failed on purpose: this is about the weights."""
    from transformers import AutoModelForCausalLM

    from llmrun.engine.build import EngineOptions
    from llmrun.engine.tokenizer import load_tokenizer
    from llmrun.runtime import open_model

    monkeypatch.setenv("LLMRUN_FAIL_CHECKS", "vnni_gemm")
    folder, reference = kept_entry[0], reference_float_folder(kept_entry[0], tmp_path / "reference")
    ids = load_tokenizer(folder).encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)[:MAX_TOKENS]
    tops = []
    for model in (folder, reference):
        options = EngineOptions(dtype="bfloat16", ctx=MAX_TOKENS, gpu_mem_bytes=0)
        with open_model(str(model), options, show_progress=False).engine as engine:
            tops.append(teacher_forced_top_tokens(engine, ids))
    agreement = (tops[0] == tops[1]).float().mean().item()
    theirs = []
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(reference, dtype=dtype)
        with torch.inference_mode():
            theirs.append(model(torch.tensor([ids])).logits[0].argmax(-1))
    noise = (theirs[0] == theirs[1]).float().mean().item()
    print(f"bf16, kept against its float values: top-token agreement over {len(ids)} positions: "
          f"{agreement:.4f} (transformers' bf16 against its float32: {noise:.4f})")
    assert agreement >= noise
