"""`llmrun chat` with piped stdin: one turn per line, only replies on stdout, no escape codes."""

import json
import re

import pytest

from tests.cli.helpers import assert_one_line_error, run_cli

ESCAPE = re.compile(r"\x1b|\x9b")  # ESC or CSI: any ANSI control sequence starts with one


def chat(model, home, lines, *options, **env):
    """`llmrun chat [MODEL]` with `lines` piped in (model None: $LLMRUN_MODEL decides)."""
    return run_cli(["chat", *([model] if model else []), "-t", "0", "--dtype", "float32", *options], home,
                   stdin="".join(f"{line}\n" for line in lines), **env)


def replies_of(path):
    return [m for m in json.loads(path.read_text())["messages"] if m["role"] == "assistant"]


def test_piped_turns_give_one_plain_reply_each_on_stdout(tiny_chat_model, tmp_path):
    saved = tmp_path / "chat.json"
    lines = ["Hello, how are you today?", "", "The capital of France is Paris.", "/set max_tokens 6",
             "def main():", f"/save {saved}"]
    # FORCE_COLOR would make Rich colour a pipe: the piped mode must not use Rich on stdout at all.
    proc = chat(tiny_chat_model, tmp_path, lines, "-n", "12", FORCE_COLOR="1", TERM="xterm-256color")
    assert proc.returncode == 0, proc.stderr
    assert not ESCAPE.search(proc.stdout)
    replies = replies_of(saved)
    assert len(replies) == 3  # three non-empty, non-command lines: three turns
    assert proc.stdout == "\n".join(r["content"] + "\n" for r in replies)
    assert [len(r["content"]) > 0 for r in replies] == [True] * 3
    stats = [line for line in proc.stderr.splitlines() if "prefilled" in line]
    assert len(stats) == 3 and ", 0 reused" in stats[0] and ", 0 reused" not in stats[1]
    assert "max_tokens = 6" in proc.stderr and f"to {saved}" in proc.stderr
    assert len(proc.stderr.splitlines()) == 5 and not ESCAPE.search(proc.stderr)  # no progress bars


def test_a_tiny_context_drops_the_oldest_turns_with_a_notice_and_keeps_the_system(tiny_chat_model, tmp_path):
    saved = tmp_path / "chat.json"
    turns = ["Hello, how are you today?", "The capital of France is Paris.", "def main():",
             "Numbers: 1 2 3", "a b c d e f g", "The capital of Italy is Rome."]
    proc = chat(tiny_chat_model, tmp_path, [*turns, f"/save {saved}"], "--ctx", "96", "-n", "8", "-q",
                "--system", "You are terse.")
    assert proc.returncode == 0, proc.stderr
    notices = [line for line in proc.stderr.splitlines() if "outgrew the context" in line]
    assert notices and all("context (96 tokens)" in n and "kept the system prompt" in n for n in notices)
    assert all(re.search(r": dropped the (oldest turn|[2-9] oldest turns), kept", n) for n in notices), notices
    messages = json.loads(saved.read_text())["messages"]
    assert messages[0] == {"role": "system", "content": "You are terse."}
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert 1 <= len(users) < len(turns) and users == turns[-len(users):]
    assert proc.stdout.count("\n\n") >= len(turns) - 1  # still one reply per turn


def test_a_mistake_in_a_script_is_reported_and_the_script_goes_on_then_exits_1(tiny_chat_model, tmp_path):
    saved = tmp_path / "chat.json"
    lines = ["/frobnicate", "first message", "/set top_k 2.5", "/load missing.json", "/set temperature nan",
             "second message", f"/save {saved}"]
    proc = chat(None, tmp_path, lines, "-n", "6", "-q", LLMRUN_MODEL=tiny_chat_model)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [
        "llmrun: error: unknown command /frobnicate: /help lists the commands "
        "(start with // to send a message that begins with /)",
        "llmrun: error: top_k must be an integer >= 0, got '2.5'",
        "llmrun: error: cannot read missing.json: No such file or directory",
        "llmrun: error: temperature must be a number >= 0, got nan",
        f"saved 2 turns to {saved}",
    ]
    users = [m["content"] for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users == ["first message", "second message"]  # every turn after a mistake was still answered
    assert proc.stdout == "\n".join(r["content"] + "\n" for r in replies_of(saved))


def test_accepted_values_however_extreme_are_answered_and_the_script_exits_0(tiny_chat_model, tmp_path):
    """1e-300 rounds to 0 in float32: sampling must still pick a token (the best), not fail."""
    lines = ["/set top_k 2", "/set temperature 1e-300", "/set repeat_penalty 1e-300", "hello", "and again"]
    proc = chat(tiny_chat_model, tmp_path, lines, "-n", "4", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "top_k = 2\ntemperature = 1e-300\nrepeat_penalty = 1e-300\n"
    assert proc.stdout.strip()  # the replies


@pytest.mark.slow
def test_smollm2_answers_after_refused_set_values(smollm2_home, tmp_path):
    lines = ["/set temperature nan", "/set top_k 2.5", f"/set seed {2**70}", "/set top_p 2", "/bogus",
             "/load missing.json", "Say the word banana."]
    proc = chat("smollm2", tmp_path, lines, "-n", "16", "-q", LLMRUN_HOME=smollm2_home)
    assert proc.returncode == 1, proc.stderr
    errors = proc.stderr.splitlines()
    assert len(errors) == 6 and all(line.startswith("llmrun: error: ") for line in errors), proc.stderr
    assert f"seed must be an integer from 0 to {2**64 - 1}, got {2**70}" in errors[2]
    assert "banana" in proc.stdout.lower()


def test_a_model_without_a_chat_template_is_refused(tiny_chat_model, tmp_path):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_chat_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in bare.glob("chat_template.j*"):
        extra.unlink()
    assert_one_line_error(chat(bare, tmp_path, ["hi"]), "no chat template")


def test_ctrl_c_ends_a_piped_chat_with_status_130(tiny_chat_model, tmp_path):
    import signal
    import subprocess
    import sys

    from tests.cli.helpers import cli_env

    proc = subprocess.Popen(
        [sys.executable, "-m", "llmrun", "chat", str(tiny_chat_model), "-t", "0", "-n", "4"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(tmp_path),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a shell's `&` ignores it
    proc.stdin.write(b"Hello\n")
    proc.stdin.flush()
    assert proc.stdout.readline()  # the first reply; now it waits for the next line
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert stderr.decode().splitlines()[-1] == "llmrun: interrupted"
