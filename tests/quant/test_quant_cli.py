"""`llmrun quantize`, `--quant` and `llmrun perplexity` as a person runs them (subprocesses), bad input
included: each mistake is one line (or Typer's usage error), and nothing is left half-written."""

import json
import signal
import subprocess
import sys
import time

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from llmrun.quant.stored import METADATA_KEY
from tests.checkpoints import llama_config, save_checkpoint, save_sparse_checkpoint
from tests.cli.helpers import assert_one_line_error, assert_usage_error, cli_env, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("qcli") / "tiny", llama_config(), seed=7)


def store(home):
    return home / "llmrun-home" / "models"


def test_quantize_writes_a_store_model_that_runs_and_says_so(tiny, tmp_path):
    made = run_cli(["quantize", tiny, "--to", "int4", "--group", "64", "--name", "tq"], tmp_path)
    assert made.returncode == 0, made.stderr
    assert "tq: 21 layer matmuls in int4 g64, the head/embeddings in int8 g32 (quantized by llmrun)" in made.stderr
    entry = store(tmp_path) / "tq"
    meta = json.loads((entry / "llmrun.json").read_text())
    assert meta["source"] == "quantize" and meta["quant"]["bits"] == [4, 8] and meta["quant"]["groups"] == [32, 64]
    with safe_open(str(entry / "model.safetensors"), "pt") as handle:
        block = json.loads(handle.metadata()[METADATA_KEY])
        assert "model.layers.0.self_attn.q_proj.weight.qweight" in handle.keys()
        assert "model.layers.0.self_attn.q_proj.weight" not in handle.keys()
        assert handle.get_tensor("model.embed_tokens.weight").dtype.itemsize == 2  # kept in 16 bits
    assert "model.norm.weight" in block["kept_16bit"]
    ran = run_cli(["run", "tq", "Hello", "-t", "0", "-n", "4", "--raw", "--dtype", "float32", "--gpu-mem", "0"],
                  tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "tq: 21 layer matmuls in int4 g64, the head/embeddings in int8 g32 (quantized by llmrun), as stored" in ran.stderr
    plan = run_cli(["plan", "tq", "--json", "--gpu-mem", "0"], tmp_path)
    assert plan.returncode == 0, plan.stderr


def test_quant_on_run_is_announced_and_planned_smaller(tiny, tmp_path):
    ran = run_cli(["run", tiny, "Hello", "-t", "0", "-n", "4", "--raw", "--quant", "int8", "--gpu-mem", "0"],
                  tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "layer matmuls in int8 per channel, the head/embeddings in int8 g32 (quantized by llmrun), quantized on load, cached" in ran.stderr
    plain = run_cli(["run", tiny, "Hello", "-t", "0", "-n", "4", "--raw", "--gpu-mem", "0"], tmp_path)
    assert "matmul weights" not in plain.stderr  # never chosen silently
    sizes = {}
    for quant in ("none", "int4"):
        done = run_cli(["plan", tiny, "--json", "--gpu-mem", "0", "--quant", quant, "--dtype", "bfloat16"], tmp_path)
        assert done.returncode == 0, done.stderr
        sizes[quant] = json.loads(done.stdout)["model"]["weight_bytes"]
    # the 3 layers' matmuls (q, o 64x64; k, v 32x64; gate, up, down 128x64): 36864 weights each, bf16 2 bytes
    # each, int4 g32 half a byte plus a float32 scale and min per 32; the head (320 x 64) int8 plus a
    # float32 scale per 32
    matmuls, head = 3 * 36864, 320 * 64
    assert sizes["none"] - sizes["int4"] == matmuls * 2 - (matmuls // 2 + matmuls // 32 * 8) + head * 2 - (head + head // 32 * 4)


def test_an_existing_name_is_refused_unless_forced(tiny, tmp_path):
    assert run_cli(["quantize", tiny, "--name", "tq"], tmp_path).returncode == 0
    before = (store(tmp_path) / "tq" / "model.safetensors").stat().st_mtime_ns
    again = run_cli(["quantize", tiny, "--to", "int8", "--name", "tq"], tmp_path)
    assert_one_line_error(again, "the store already has a model called 'tq'; pass --force")
    assert (store(tmp_path) / "tq" / "model.safetensors").stat().st_mtime_ns == before
    forced = run_cli(["quantize", tiny, "--to", "int8", "--name", "tq", "--force"], tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert json.loads((store(tmp_path) / "tq" / "llmrun.json").read_text())["quant"]["bits"] == [8]


@pytest.mark.parametrize("args, fragment", [
    (["run", "MODEL", "hi", "--quant", "int5"], "unknown quantization 'int5'"),
    (["plan", "MODEL", "--quant", "fp4"], "unknown quantization 'fp4'"),
    (["quantize", "MODEL", "--to", "int3"], "unknown quantization 'int3'"),
    (["quantize", "MODEL", "--group", "many"], "Invalid value for '--group'"),
    (["perplexity", "MODEL", "FILE", "--chunk", "0"], "must be an integer from 1 to 512, got 0"),
    (["perplexity", "MODEL", "FILE", "--chunk", "513"], "must be an integer from 1 to 512, got 513"),
    (["perplexity", "MODEL", "FILE", "--chunk", "some"], "Invalid value for '--chunk'"),
])
def test_unknown_values_are_usage_errors(tiny, tmp_path, args, fragment):
    text = tmp_path / "text.txt"
    text.write_text("Some words to score.")
    args = [{"MODEL": str(tiny), "FILE": str(text)}.get(a, a) for a in args]
    assert_usage_error(run_cli(args, tmp_path), fragment)


@pytest.mark.parametrize("args, fragment", [
    (["quantize", "MODEL", "--to", "int4", "--group", "128"], "group 128 does not divide model.layers.0."),
    (["quantize", "MODEL", "--to", "int4", "--group", "48"], "int4 groups are 32, 64, 128, not 48"),
    (["run", "MODEL", "hi", "--quant", "int4", "--gpu-mem", "0", "--dtype", "float32", "-n", "1"], None),
])
def test_groups_outside_the_format_or_the_layers_are_one_line(tiny, tmp_path, args, fragment):
    args = [str(tiny) if a == "MODEL" else a for a in args]
    done = run_cli(args, tmp_path)
    if fragment is None:  # int4's default group (32) divides the tiny model's 64 and 128 inputs
        assert done.returncode == 0, done.stderr
        return
    assert_one_line_error(done, fragment)
    assert not store(tmp_path).exists() or not list(store(tmp_path).iterdir())


def test_an_inconsistent_metadata_block_is_one_line(tiny, tmp_path):
    assert run_cli(["quantize", tiny, "--name", "tq"], tmp_path).returncode == 0
    file = store(tmp_path) / "tq" / "model.safetensors"
    with safe_open(str(file), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        block = json.loads(handle.metadata()[METADATA_KEY])
    del block["tensors"]["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(file), metadata={METADATA_KEY: json.dumps(block)})
    done = run_cli(["run", "tq", "hi", "--gpu-mem", "0", "-n", "1"], tmp_path)
    assert_one_line_error(done, "model.layers.1.mlp.up_proj.weight is quantized but not in the 'llmrun.quant' block")
    save_file(tensors, str(file))  # no block at all
    done = run_cli(["run", "tq", "hi", "--gpu-mem", "0", "-n", "1"], tmp_path)
    assert_one_line_error(done, "quantized tensors but no 'llmrun.quant' metadata block")


def test_an_already_quantized_model_refuses_quant_again(tiny, tmp_path):
    assert run_cli(["quantize", tiny, "--name", "tq"], tmp_path).returncode == 0
    done = run_cli(["run", "tq", "hi", "--quant", "int8", "--gpu-mem", "0", "-n", "1"], tmp_path)
    assert_one_line_error(done, "is already quantized; run it without --quant")
    again = run_cli(["quantize", "tq", "--name", "tq2"], tmp_path)
    assert_one_line_error(again, "tq is already quantized; quantize its float original instead")


def test_an_interrupted_quantize_leaves_nothing(tmp_path):
    big = save_sparse_checkpoint(tmp_path / "big", llama_config(hidden_size=2048, intermediate_size=5632,
                                                                num_hidden_layers=6, num_attention_heads=16,
                                                                num_key_value_heads=16))
    proc = subprocess.Popen([sys.executable, "-m", "llmrun", "quantize", str(big), "--name", "big"],
                            env=cli_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's `&` ignores it
    deadline = time.monotonic() + 120
    while not (store(tmp_path).is_dir() and list(store(tmp_path).glob(".tmp-big-*"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "llmrun: interrupted" in err and "Traceback" not in err
    assert list(store(tmp_path).iterdir()) == []


def test_perplexity_command_scores_the_file(tiny, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The capital of France is Paris. Hello, how are you today? " * 4)
    done = run_cli(["perplexity", tiny, text, "--json", "--gpu-mem", "0", "--dtype", "float32"], tmp_path)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["weights"] == "float" and data["num_scored"] == data["num_tokens"] - 1 > 20
    quant = run_cli(["perplexity", tiny, text, "--json", "--gpu-mem", "0", "--dtype", "float32", "--quant", "int4"],
                    tmp_path)
    assert quant.returncode == 0, quant.stderr
    assert json.loads(quant.stdout)["weights"] == ("21 layer matmuls in int4 g32, the head/embeddings in int8 g32 "
                                                   "(quantized by llmrun)")
    assert json.loads(quant.stdout)["perplexity"] != data["perplexity"]
    # one token a forward (the decode steps' kernels): the same text scored, within float32 rounding
    steps = run_cli(["perplexity", tiny, text, "--json", "--gpu-mem", "0", "--dtype", "float32", "--chunk", "1"],
                    tmp_path)
    assert steps.returncode == 0, steps.stderr
    by_step = json.loads(steps.stdout)
    assert (by_step["chunk"], data["chunk"]) == (1, 512) and by_step["num_scored"] == data["num_scored"]
    assert (by_step["num_forwards"], data["num_forwards"]) == (data["num_tokens"], 1)
    assert by_step["mean_nll"] == pytest.approx(data["mean_nll"], rel=1e-4)
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_line_error(run_cli(["perplexity", tiny, empty], tmp_path), "is empty: perplexity needs a text")
    assert_one_line_error(run_cli(["perplexity", tiny, tmp_path / "absent.txt"], tmp_path), "cannot read")
