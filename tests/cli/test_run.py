"""`llmrun run` through a real subprocess: stdout carries only model text, errors are one line."""

import json
import subprocess
import sys

import pytest
import torch

from tests.checkpoints import llama_config, save_checkpoint
from tests.cli.helpers import assert_one_line_error, cli_env, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", llama_config(), seed=11)


@pytest.fixture()
def home(tmp_path):
    return tmp_path


def transformers_greedy(folder, ids, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def tokenize(folder, text):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(text)["input_ids"]


def test_json_output_has_transformers_greedy_tokens(tiny, home):
    proc = run_cli(["run", tiny, "The capital of France", "--raw", "-t", "0", "-n", "16",
                    "--dtype", "float32", "--json"], home)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    ids = tokenize(tiny, "The capital of France")
    assert result["tokens"] == transformers_greedy(tiny, ids, 16)[: len(result["tokens"])]
    assert result["prompt_tokens"] == len(ids)
    assert result["generated_tokens"] == len(result["tokens"])
    assert result["finish_reason"] in ("length", "eos")
    assert set(result) >= {"text", "ttft_s", "decode_tok_s"}


def test_stdin_goes_before_the_prompt_argument(tiny, home):
    proc = run_cli(["run", tiny, "and Italy", "--raw", "-t", "0", "-n", "2", "--json"], home,
                   stdin="The capital of France\n")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["prompt_tokens"] == len(tokenize(tiny, "The capital of France\n\nand Italy"))
    alone = run_cli(["run", tiny, "--raw", "-t", "0", "-n", "2", "--json"], home, stdin="Hello there")
    assert json.loads(alone.stdout)["prompt_tokens"] == len(tokenize(tiny, "Hello there"))


def test_plain_stdout_is_only_model_text_and_stats_go_to_stderr(tiny, home):
    args = ["run", tiny, "Hello", "--raw", "-t", "0", "-n", "12", "--dtype", "float32"]
    plain = run_cli(args, home)
    as_json = json.loads(run_cli(args + ["--json"], home).stdout)
    assert plain.returncode == 0, plain.stderr
    text = as_json["text"]
    assert plain.stdout == (text if text.endswith("\n") else text + "\n")  # a reply always ends a line
    assert "\x1b[" not in plain.stdout
    assert "prompt tokens" in plain.stderr and "tok/s" in plain.stderr
    quiet = run_cli(args + ["--quiet"], home)
    assert quiet.stderr == "" and quiet.stdout == plain.stdout


def test_chat_template_is_applied_unless_raw(tiny, home):
    chat = json.loads(run_cli(["run", tiny, "Hello", "-t", "0", "-n", "1", "--json"], home).stdout)
    raw = json.loads(run_cli(["run", tiny, "Hello", "-t", "0", "-n", "1", "--raw", "--json"], home).stdout)
    assert chat["prompt_tokens"] > raw["prompt_tokens"]
    system = run_cli(["run", tiny, "Hello", "--system", "Be brief.", "-n", "1", "--json"], home)
    assert json.loads(system.stdout)["prompt_tokens"] > chat["prompt_tokens"]


def test_stop_string_is_not_emitted(tiny, home):
    base = json.loads(run_cli(["run", tiny, "Hi", "--raw", "-t", "0", "-n", "24", "--json"], home).stdout)
    text = base["text"]
    if len(text.strip()) < 4:
        pytest.skip("the random model produced too little text to pick a stop string")
    stop = text.strip()[2:4]
    cut = json.loads(run_cli(["run", tiny, "Hi", "--raw", "-t", "0", "-n", "24", "--stop", stop, "--json"],
                            home).stdout)
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.find(stop)]


def test_same_seed_same_text(tiny, home):
    args = ["run", tiny, "Hello", "--raw", "-t", "1.0", "-n", "16", "--seed", "42", "--json"]
    first, second = (json.loads(run_cli(args, home).stdout)["tokens"] for _ in range(2))
    assert first == second


def test_closed_pipe_ends_quietly(tiny, home):
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmrun", "run", str(tiny), "Hello", "--raw", "-t", "0", "-n", "200"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(home),
    )
    proc.stdout.read(1)
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in stderr and "Broken pipe" not in stderr


@pytest.mark.parametrize("args,stdin,fragment", [
    ([], "", "no prompt"),
    (["   "], "\n", "no prompt"),
    (["Hello", "--ctx", "100000"], "", "beyond the model's maximum context of 256"),
])
def test_bad_input_is_one_line_error(tiny, home, args, stdin, fragment):
    assert_one_line_error(run_cli(["run", tiny, *args], home, stdin=stdin), fragment)


def test_prompt_longer_than_context_names_both_lengths(tiny, home):
    proc = run_cli(["run", tiny, "Hello there " * 30, "--raw", "--ctx", "16"], home)
    assert_one_line_error(proc, "but the context window is 16 tokens")
    assert "the prompt has" in proc.stderr


def test_unsupported_architecture_lists_supported(tiny, home, tmp_path):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(tiny, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["FancyNewForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli(["run", odd, "Hi"], home), "supported: LlamaForCausalLM")


def test_corrupt_weights_name_the_file(tiny, home, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    assert_one_line_error(run_cli(["run", broken, "Hi"], home), "model.safetensors is truncated")


def test_help_lists_commands_without_importing_torch(home):
    proc = run_cli(["--help"], home)
    assert proc.returncode == 0
    for command in ("run", "pull", "import", "models"):
        assert command in proc.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import sys; sys.argv=['llmrun','--help']\n"
         "from llmrun.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
         "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)"],
        capture_output=True, text=True, env=cli_env(home),
    )
    assert probe.stderr.strip().endswith("NO-TORCH")
